#!/usr/bin/env bash
# README's main job as a new user meets it: a fresh clone and a fresh virtual environment, README's
# set-up-and-run command (DDPO with R_balance on the digits miniature), then `validate` on the
# checkpoint it wrote, then README's Python snippet (the trained LoRA loaded and sampled) in a fresh
# process. About 10 minutes on 2 CPU cores, most of it the install and the 30-epoch job.
#
#   bash benchmarks/readme_main_job.sh [WORK_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
git clone -q "$repo" "$work/clone"
cd "$work/clone"

main_job=$(grep -m1 -E '^python3 -m venv .*lightning_sdrl fit -c configs/digits/ddpo_balance.yaml' README.md)
echo "== README main job: $main_job"
start=$(date +%s)
bash -c "$main_job"
echo "== main job (set-up included): $(( $(date +%s) - start )) s"
. .venv/bin/activate

run=runs/digits_balance
for file in attributes.json attributes.png samples_before.png samples_after.png metrics.csv \
            checkpoints/last.ckpt trained/pytorch_lora_weights.safetensors; do
  test -f "$run/$file" || { echo "missing $run/$file"; exit 1; }
done

validate=$(grep -m1 -E '^python -m lightning_sdrl validate -c configs/digits/ddpo_balance.yaml' README.md)
echo "== README validate: $validate"
bash -c "$validate"

echo "== README Python snippet, in a fresh process"
awk '/^```python/{n++; if (n==1) {on=1; next}} /^```/{on=0} on' README.md > "$work/snippet.py"
cat "$work/snippet.py"
python "$work/snippet.py"
echo "== all README main-job steps passed in $work/clone"
