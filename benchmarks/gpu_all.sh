#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md, on one H100/H200-class GPU, in a few minutes per part.
#
#   bash benchmarks/gpu_all.sh             # all five parts, one after the other
#   bash benchmarks/gpu_all.sh sd15        # one part: sd15 | sd15-fp32 | sd35 | sdxl | flux
#
# Each part prints one markdown table (copy it into docs/benchmarks.md) and writes it to
# $OUT/<part>.md (OUT defaults to benchmarks/gpu_results). Weights are random: nothing is downloaded.
#
#   sd15       SD 1.5 architecture, 512x512, batch 16, 50 DDIM steps, CFG 5, eta 1, LoRA r 4, DDPO
#              micro-batch 8 (the goals' settings): bf16 frozen weights, eager vs torch.compile,
#              training one timestep per UNet call vs 5.
#   sd15-fp32  the same with float32 frozen weights (bf16 autocast), eager, one timestep per call.
#   sd35       SD 3.5 Medium architecture, 512x512, batch 16 (one GRPO group), 10 SDE steps, CFG 4.5,
#              LoRA r 32 / alpha 64: bf16 weights, eager vs torch.compile, timestep batch 1 vs 5.
#   sdxl       SDXL base architecture, 1024x1024, batch 8, 50 DDIM steps, CFG 5, eta 1, LoRA r 4, DDPO
#              micro-batch 2: bf16 weights, eager, one timestep per UNet call.
#   flux       FLUX.1-dev architecture, 512x512, batch 8 (one GRPO group), 6 SDE steps, guidance
#              embedding 3.5, noise level 0.9, LoRA r 32 / alpha 64, micro-batch 2: bf16, eager.
#
# MFU is against PEAK_TFLOPS (default 790, the dense bf16 peak the performance issue uses for H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu_results}
PEAK=${PEAK_TFLOPS:-790}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(sd15 sd15-fp32 sd35 sdxl flux)

run() {
    local part=$1
    shift
    echo "== $part: python benchmarks/throughput.py $*" >&2
    python benchmarks/throughput.py --repeats 1 --peak-tflops "$PEAK" "$@" | tee "$OUT/$part.md"
}

for part in "${parts[@]}"; do
    case $part in
        sd15) run sd15 --architecture sd15 --train-batch 8 --compile --timestep-batch 1 5 ;;
        sd15-fp32) run sd15-fp32 --architecture sd15 --train-batch 8 --weights-dtype float32 ;;
        sd35) run sd35 --architecture sd35-medium --train-batch 4 --compile --timestep-batch 1 5 ;;
        sdxl) run sdxl --architecture sdxl --batch 8 --train-batch 2 ;;
        flux) run flux --architecture flux-dev --batch 8 --train-batch 2 ;;
        *) echo "unknown part '$part'; expected sd15, sd15-fp32, sd35, sdxl or flux" >&2; exit 2 ;;
    esac
done
