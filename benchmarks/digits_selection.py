"""Post-sampling selection (Table 1 of the diversity paper, docs/references.md) on the digits model.

For each of the ten prompts "a handwritten <digit>", ``--groups-per-prompt`` groups of O images
are sampled from the shipped digits model; in each group the subset of M images with the
maximum / minimum MMD reward (eq. 11; ``--reward`` for variants) against ~50 training digits of the
prompt's class is kept, or M random ones (``--random-draws`` times). The union of kept images of each mode is compared
with real digits (default: every digit not in any X_r, 1297 images; ``--evaluation-split``) by
FID and precision/recall (k = 3) in the digit feature network's space, the network the reward
uses too.

    python benchmarks/digits_selection.py [--out docs/digits_selection.json]

Prints a markdown table and writes it, the settings and the per-draw values as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sdrl.digits.captions import digit_captions
from lightning_sdrl.digits.features import DigitsFeatures
from lightning_sdrl.digits.policy import DigitsPolicy
from lightning_sdrl.digits.reference import DigitsReference
from lightning_sdrl.evaluation import PostSamplingSelection, post_sampling_selection
from lightning_sdrl.functional.diversity import gp_mi_reward, mmd_reward

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [digit_captions(digit)[0] for digit in range(10)]  # "a handwritten zero", ...


def mmd_normalised(gen_feats: Tensor, ref_feats: Tensor) -> Tensor:
    """``mmd_reward`` on L2-normalised features (cosine geometry, as CLIP features)."""
    return mmd_reward(F.normalize(gen_feats, dim=-1), F.normalize(ref_feats, dim=-1))


def gp_mi_normalised(gen_feats: Tensor, ref_feats: Tensor) -> Tensor:
    """``gp_mi_reward`` (lengthscale 1) on L2-normalised features, as ``DiversityReward(normalize=True)``."""
    return gp_mi_reward(F.normalize(gen_feats, dim=-1), F.normalize(ref_feats, dim=-1))


REWARDS = {"mmd": mmd_reward, "mmd-normalised": mmd_normalised, "gp_mi-normalised": gp_mi_normalised}


def evaluation_images(split: str, reference_indices: Tensor) -> Tensor:
    """The real digits the kept images are compared with.

    ``test``: the held-out split; ``train``: the training split (as the paper's ImageNet reference
    statistics), which contains the reference sets X_r; ``unused``: every digit X_r did not use
    (the training digits outside X_r and the test split), so that no evaluation image is a
    reference image.
    """
    if split == "test":
        return DigitsReference(split="test").images
    train = DigitsReference(split="train")
    if split == "train":
        return train.images
    keep = ~torch.isin(train.indices, reference_indices)
    return torch.cat([train.images[keep], DigitsReference(split="test").images])


def run(args: argparse.Namespace) -> tuple[PostSamplingSelection, float]:
    """Post-sampling selection with the shipped digits model; returns the result and its wall time."""
    reference_sets = [
        DigitsReference(split="train", classes=[digit], per_class=args.reference_size, seed=args.seed)
        for digit in range(10)
    ]
    references = [reference.images for reference in reference_sets]
    evaluation = evaluation_images(args.evaluation_split, torch.cat([r.indices for r in reference_sets]))
    start = time.perf_counter()
    result = post_sampling_selection(
        DigitsPolicy(lora=None),
        PROMPTS,
        references,
        evaluation,
        DigitsFeatures(),
        reward_fn=REWARDS[args.reward],
        num_sampled=args.num_sampled,
        subset_size=args.subset_size,
        groups_per_prompt=args.groups_per_prompt,
        random_draws=args.random_draws,
        seed=args.seed,
        num_steps=args.num_steps,
        guidance_scale=args.guidance_scale,
    )
    return result, time.perf_counter() - start


def table(result: PostSamplingSelection, reward: str = "mmd") -> str:
    """The markdown table: one row per selection mode (random: mean +- std over draws)."""
    rows = [f"| selection | FID | precision | recall | mean {reward} reward |", "| --- | --- | --- | --- | --- |"]
    names = {"random": "random (baseline)", "max": f"max {reward}", "min": f"min {reward}"}
    for mode, res in result.modes.items():
        if len(res.fids) > 1:
            cells = [f"{v.mean():.2f} +- {v.std():.2f}" for v in (res.fids, 100 * res.precisions, 100 * res.recalls)]
        else:
            cells = [f"{res.fid:.2f}", f"{100 * res.precision:.2f}", f"{100 * res.recall:.2f}"]
        rows.append(f"| {names[mode]} | {' | '.join(cells)} | {res.mean_reward:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "digits_selection.json", help="JSON file")
    parser.add_argument("--groups-per-prompt", type=int, default=20, help="groups of O images per prompt")
    parser.add_argument("--num-sampled", type=int, default=10, help="O, images sampled per group")
    parser.add_argument("--subset-size", type=int, default=5, help="M, images kept per group")
    parser.add_argument("--reference-size", type=int, default=50, help="training digits per class in X_r")
    parser.add_argument("--reward", choices=sorted(REWARDS), default="mmd", help="set reward of the selection")
    parser.add_argument("--random-draws", type=int, default=5, help="repetitions of the random selection")
    parser.add_argument(
        "--evaluation-split",
        choices=("test", "train", "unused"),
        default="unused",
        help="real digits the kept images are evaluated against: the test split, the training split "
        "(as the paper; contains X_r) or every digit outside X_r",
    )
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--num-steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise, the draws and X_r")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result, seconds = run(args)
    text = table(result, args.reward)
    print(text)
    print(f"\n{len(result.group_prompts)} groups, {seconds:.0f} s")
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    summary = {"settings": settings, "seconds": seconds, "table": text, "modes": result.to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
