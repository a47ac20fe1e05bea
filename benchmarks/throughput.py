"""Sampling and RL training throughput, FLOP rate and peak memory: DDPO on SD1.5 and SDXL, GRPO on SD3.

Compares, at equal settings, our sampler (which keeps every latent and step log-prob) with the
stock diffusers pipeline call on the same denoiser / VAE / text encoders, and times one RL epoch
(sampling + PPO updates over every timestep) through the real LightningModule and a Lightning
``Trainer``. Three model families:

- Stable Diffusion 1.x (``tiny``, ``sd15``): DDIM sampling vs ``StableDiffusionPipeline``, a
  ``DDPOModule`` epoch, LoRA rank 4.
- Stable Diffusion XL (``sdxl-tiny``, ``sdxl``): DDIM sampling vs ``StableDiffusionXLPipeline``,
  a ``DDPOModule`` epoch, LoRA rank 4 (``sdxl``: 1024x1024 unless ``--resolution``).
- FLUX.1 (``flux-tiny``, ``flux-dev``): Flow-GRPO's SDE sampling vs ``FluxPipeline`` (its Euler ODE
  on the resolution-shifted schedule, guidance embedding 3.5), a ``GRPOModule`` epoch, LoRA rank 32 /
  alpha 64 on Flow-GRPO's FLUX targets (``flux-dev``: 512x512 unless ``--resolution``).
- Stable Diffusion 3 (``sd3-tiny``, ``sd35-medium``): Flow-GRPO's SDE sampling vs
  ``StableDiffusion3Pipeline`` (its Euler ODE), a ``GRPOModule`` epoch on one prompt whose group
  is the whole batch, LoRA rank 32 / alpha 64 on Flow-GRPO's target modules.

Weights are random (time does not depend on their values), so nothing is downloaded. One run
compares variants at equal settings: ``--weights-dtype`` (the policy's ``torch_dtype`` for the
frozen weights; LoRA trains in float32), ``--compile`` (eager and ``torch.compile``-d denoiser),
``--timestep-batch`` (trained steps per denoiser call).

    python benchmarks/throughput.py                              # CPU: tiny SD1.5-style components
    python benchmarks/throughput.py --timestep-batch 1 10        # ... training per step vs 10 steps per call
    python benchmarks/throughput.py --architecture sd15 --compile --weights-dtype float32 bfloat16   # CUDA
    python benchmarks/throughput.py --architecture sd3-tiny      # CPU: tiny SD3 components
    python benchmarks/throughput.py --architecture sd35-medium   # CUDA: SD3.5 Medium, bf16, 512x512
    python benchmarks/throughput.py --architecture sdxl-tiny     # CPU: tiny SDXL components
    python benchmarks/throughput.py --architecture sdxl          # CUDA: SDXL base, bf16, 1024x1024
    python benchmarks/throughput.py --architecture flux-tiny     # CPU: tiny FLUX.1 components
    python benchmarks/throughput.py --architecture flux-dev      # CUDA: FLUX.1-dev, bf16, 512x512

Prints one table; figures are recorded in docs/benchmarks.md (benchmarks/gpu_all.sh runs the GPU ones).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.modules.grpo import GRPOModule
from lightning_sdrl.policies import (
    LoRASettings,
    RandomFluxPolicy,
    RandomStableDiffusionXLPolicy,
    RandomTextToImagePolicy,
)
from lightning_sdrl.policies.architectures import sd3_components
from lightning_sdrl.policies.base import DiffusionPolicy, Trajectory
from lightning_sdrl.policies.flux import FLOW_GRPO_FLUX_LORA_TARGET_MODULES
from lightning_sdrl.policies.loading import resolve_dtype
from lightning_sdrl.policies.sd3 import FLOW_GRPO_LORA_TARGET_MODULES, SD3Policy
from lightning_sdrl.rewards.simple import Brightness

SD15_ARCHITECTURES = ("tiny", "sd15")
SD3_ARCHITECTURES = ("sd3-tiny", "sd35-medium")
SDXL_ARCHITECTURES = ("sdxl-tiny", "sdxl")
FLUX_ARCHITECTURES = ("flux-tiny", "flux-dev")
DEFAULTS = {  # per family: sampling steps, guidance, eta / noise level (DDPO's and Flow-GRPO's)
    "sd15": {"steps": 50, "guidance": 5.0, "eta": 1.0},
    "sdxl": {"steps": 50, "guidance": 5.0, "eta": 1.0},
    "flux": {"steps": 6, "guidance": 3.5, "eta": 0.9},  # Flow-GRPO's FLUX.1 settings
    "sd3": {"steps": 10, "guidance": 4.5, "eta": 0.7},
}
FAMILIES = {
    **dict.fromkeys(SD15_ARCHITECTURES, "sd15"),
    **dict.fromkeys(SD3_ARCHITECTURES, "sd3"),
    **dict.fromkeys(SDXL_ARCHITECTURES, "sdxl"),
    **dict.fromkeys(FLUX_ARCHITECTURES, "flux"),
}
SD3_LORA = LoRASettings(rank=32, alpha=64, target_modules=list(FLOW_GRPO_LORA_TARGET_MODULES))
FLUX_LORA = LoRASettings(rank=32, alpha=64, target_modules=list(FLOW_GRPO_FLUX_LORA_TARGET_MODULES))
PROMPT = "a photo of a cat"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` calls after one warm-up (which compiles), and their peak CUDA memory in GiB.

    The peak is nan on the CPU.
    """
    fn()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def count_flops(fn) -> int:
    """FLOPs of one call (FlopCounterMode, run eagerly: compiled code performs the same ones)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@contextlib.contextmanager
def eager(policy: DiffusionPolicy) -> Iterator[None]:
    """Run ``policy``'s denoiser eagerly inside this block (to count FLOPs), whatever its ``compile``."""
    mode, policy.compile_mode = policy.compile_mode, None
    try:
        yield
    finally:
        policy.compile_mode = mode


@dataclass(frozen=True)
class Variant:
    """One configuration of the policy: frozen-weights dtype and eager or compiled denoiser."""

    weights: torch.dtype
    compiled: bool

    @property
    def label(self) -> str:
        return f"{str(self.weights).removeprefix('torch.')} weights, {'compiled' if self.compiled else 'eager'}"


@dataclass
class Setup:
    """What one model family benchmarks: a policy, its stock pipeline call and its RL module.

    Attributes:
        policy: the policy sampled and trained.
        stock: the stock diffusers pipeline on the same modules, returning images (``output_type="pt"``).
        stock_name: the pipeline's class name.
        module: a fresh LightningModule (``DDPOModule`` or ``GRPOModule``) over ``policy``, given its
            ``timestep_batch``.
        group_size: the data module's ``group_size`` (1: DDPO's independent prompts).
        header: the settings that describe the run, for the table's title.
        notes: lines printed under the table (parameter counts).
    """

    policy: DiffusionPolicy
    stock: Callable[[], Tensor]
    stock_name: str
    module: Callable[[int], DDPOModule]
    group_size: int
    header: str
    notes: list[str]


def stock_call(pipe: Any, args: argparse.Namespace, device: torch.device, **settings: Any) -> Callable[[], Tensor]:
    """The stock pipeline's call at the benchmark's batch, steps and guidance (plus ``settings``), images out."""

    def stock() -> Tensor:
        return pipe(
            [PROMPT] * args.batch,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            output_type="pt",
            generator=torch.Generator(device).manual_seed(0),
            **settings,
        ).images

    return stock


def ddpo_module(policy: DiffusionPolicy, args: argparse.Namespace) -> Callable[[int], DDPOModule]:
    """A fresh ``DDPOModule`` over ``policy`` with the benchmark's settings, given its ``timestep_batch``."""

    def module(timestep_batch: int) -> DDPOModule:
        return DDPOModule(
            policy,
            Brightness(),
            num_steps=args.steps,
            eta=args.eta,
            guidance_scale=args.guidance,
            train_batch_size=args.train_batch,
            timestep_batch=timestep_batch,
            sample_grid_every_n_epochs=0,
            save_trained_on_end=False,
        )

    return module


def sd15_setup(args: argparse.Namespace, device: torch.device, variant: Variant) -> Setup:
    """DDPO on a Stable Diffusion 1.x architecture, frozen weights in ``variant.weights`` (``torch_dtype``)."""
    if args.resolution is not None or args.no_t5:
        raise ValueError(
            f"--resolution applies to {SD3_ARCHITECTURES + SDXL_ARCHITECTURES + FLUX_ARCHITECTURES} only and "
            f"--no-t5 to {SD3_ARCHITECTURES}; drop them for --architecture {args.architecture}"
        )
    policy = RandomTextToImagePolicy(
        args.architecture, lora=LoRASettings(rank=4), torch_dtype=variant.weights, compile=variant.compiled
    ).to(device)
    pipe = StableDiffusionPipeline(
        vae=policy.vae,
        text_encoder=policy.text_encoder,
        tokenizer=policy.tokenizer,
        unet=policy.unet,
        scheduler=policy.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    stock = stock_call(pipe, args, device, eta=args.eta)
    header = f"CFG {args.guidance}, eta {args.eta}, LoRA rank 4"
    return Setup(policy, stock, type(pipe).__name__, ddpo_module(policy, args), 1, header, [])


def sdxl_setup(args: argparse.Namespace, device: torch.device, variant: Variant) -> Setup:
    """DDPO on a Stable Diffusion XL architecture, built on ``device`` in ``variant.weights``, LoRA rank 4."""
    if args.architecture == "sdxl" and device.type != "cuda":
        raise ValueError("--architecture sdxl needs a CUDA device; on CPU use --architecture sdxl-tiny")
    if args.no_t5:
        raise ValueError(f"--no-t5 applies to {SD3_ARCHITECTURES} only; SDXL has no T5: drop it")
    policy = RandomStableDiffusionXLPolicy(
        args.architecture,
        lora=LoRASettings(rank=4),
        height=args.resolution,
        width=args.resolution,
        torch_dtype=variant.weights,
        device=device,
        compile=variant.compiled,
    )
    pipe = policy.components().pipeline()
    pipe.set_progress_bar_config(disable=True)

    stock = stock_call(pipe, args, device, eta=args.eta, height=policy.height, width=policy.width)
    base = sum(p.numel() for name, p in policy.unet.named_parameters() if "lora_" not in name)
    lora = sum(p.numel() for p in policy.trainable_parameters())
    header = f"{policy.height}x{policy.width}, CFG {args.guidance}, eta {args.eta}, LoRA rank 4"
    notes = [f"UNet parameters: {base:,} ({base / 1e9:.3g} B); trainable LoRA parameters: {lora:,}"]
    return Setup(policy, stock, type(pipe).__name__, ddpo_module(policy, args), 1, header, notes)


def sd3_setup(args: argparse.Namespace, device: torch.device, variant: Variant) -> Setup:
    """Flow-GRPO on a Stable Diffusion 3 architecture, built on ``device`` in ``variant.weights``, LoRA 32 / 64."""
    if args.architecture == "sd35-medium" and device.type != "cuda":
        raise ValueError("--architecture sd35-medium needs a CUDA device; on CPU use --architecture sd3-tiny")
    if args.batch < 2:
        raise ValueError(f"--batch {args.batch}; GRPO needs a group of at least 2 samples (the batch is one group)")
    resolution = args.resolution
    if resolution is None and args.architecture == "sd35-medium":
        resolution = 512  # Flow-GRPO trains SD3.5 Medium at 512x512 (its native size is 1024)
    # The networks are initialised on the device, in the benchmark's dtype, as RandomStableDiffusion3Policy does.
    components = sd3_components(args.architecture, seed=0, dtype=variant.weights, device=device)
    if args.no_t5:  # SD3 without its T5 encoder: zero T5 embeddings, as the pipeline with text_encoder_3=None
        components = dataclasses.replace(components, text_encoder_3=None, tokenizer_3=None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    policy = SD3Policy(components, lora=SD3_LORA, height=resolution, width=resolution, compile=variant.compiled)
    pipe = policy.components().pipeline()
    pipe.set_progress_bar_config(disable=True)

    length = policy.max_sequence_length
    stock = stock_call(pipe, args, device, height=policy.height, width=policy.width, max_sequence_length=length)

    header = (
        f"{policy.height}x{policy.width}, CFG {args.guidance}, noise level {args.eta}, LoRA rank "
        f"{SD3_LORA.rank} alpha {SD3_LORA.alpha:g}, T5 {'off' if args.no_t5 else 'on'}"
    )
    return Setup(policy, stock, type(pipe).__name__, grpo_module(policy, args), args.batch, header, [counts(policy)])


def flux_setup(args: argparse.Namespace, device: torch.device, variant: Variant) -> Setup:
    """Flow-GRPO on a FLUX.1 architecture, built on ``device`` in ``variant.weights``, LoRA 32 / 64."""
    if args.architecture == "flux-dev" and device.type != "cuda":
        raise ValueError("--architecture flux-dev needs a CUDA device; on CPU use --architecture flux-tiny")
    if args.no_t5:
        raise ValueError("--no-t5 applies to the SD3 architectures only; FLUX.1's prompt is T5's: drop it")
    if args.batch < 2:
        raise ValueError(f"--batch {args.batch}; GRPO needs a group of at least 2 samples (the batch is one group)")
    resolution = args.resolution or (512 if args.architecture == "flux-dev" else None)  # Flow-GRPO's FLUX size
    policy = RandomFluxPolicy(
        args.architecture,
        lora=FLUX_LORA,
        height=resolution,
        width=resolution,
        torch_dtype=variant.weights,
        device=device,
        compile=variant.compiled,
    )
    pipe = policy.components().pipeline()
    pipe.set_progress_bar_config(disable=True)
    length = policy.max_sequence_length
    stock = stock_call(pipe, args, device, height=policy.height, width=policy.width, max_sequence_length=length)
    header = (
        f"{policy.height}x{policy.width}, guidance embedding {args.guidance}, noise level {args.eta}, LoRA rank "
        f"{FLUX_LORA.rank} alpha {FLUX_LORA.alpha:g}"
    )
    return Setup(policy, stock, type(pipe).__name__, grpo_module(policy, args), args.batch, header, [counts(policy)])


def grpo_module(policy: DiffusionPolicy, args: argparse.Namespace) -> Callable[[int], GRPOModule]:
    """A fresh ``GRPOModule`` over ``policy`` with the benchmark's settings, given its ``timestep_batch``."""

    def module(timestep_batch: int) -> GRPOModule:
        return GRPOModule(
            policy,
            Brightness(),
            num_steps=args.steps,
            noise_level=args.eta,
            guidance_scale=args.guidance,
            train_batch_size=args.train_batch,
            timestep_batch=timestep_batch,
            sample_grid_every_n_epochs=0,
            save_trained_on_end=False,
        )

    return module


def counts(policy: DiffusionPolicy) -> str:
    """The note line: the transformer's own parameters and the trainable LoRA ones."""
    base = sum(p.numel() for name, p in policy.denoiser.named_parameters() if "lora_" not in name)
    lora = sum(p.numel() for p in policy.trainable_parameters())
    return f"transformer parameters: {base:,} ({base / 1e9:.3g} B); trainable LoRA parameters: {lora:,}"


def run_epoch(
    setup: Setup, args: argparse.Namespace, device: torch.device, precision: str, timestep_batch: int
) -> None:
    """One RL epoch (one sampling batch of ``args.batch`` prompts, then the updates) with a Lightning Trainer."""
    data = SamplingDataModule(
        prompts=[PROMPT], batch_size=args.batch, num_batches_per_epoch=1, group_size=setup.group_size
    )
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(setup.module(timestep_batch), data)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--architecture",
        default=None,
        choices=SD15_ARCHITECTURES + SD3_ARCHITECTURES + SDXL_ARCHITECTURES + FLUX_ARCHITECTURES,
        help="default: sd15 on CUDA, tiny on CPU",
    )
    parser.add_argument("--batch", type=int, default=16, help="images per sampling call (GRPO: one group)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: SD1.5 50, SD3 10)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: SD1.5 5.0, SD3 4.5)")
    parser.add_argument(
        "--eta", "--noise-level", dest="eta", type=float, default=None, help="DDIM eta / SDE noise level (1.0 / 0.7)"
    )
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument(
        "--timestep-batch", type=int, nargs="+", default=[1], help="trained steps per denoiser call (one row each)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--dtype", default=None, help="compute dtype: autocast and Trainer precision (default: bf16 on CUDA)"
    )
    parser.add_argument(
        "--weights-dtype",
        nargs="+",
        default=None,
        help="the policy's torch_dtype for frozen weights, one variant each (default: --dtype's)",
    )
    parser.add_argument("--compile", action="store_true", help="measure the torch.compile-d denoiser next to eager")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for the MFU column (H100/H200 bf16: ~790)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side of SD3 / SDXL / FLUX (default: sd35-medium 512, sdxl 1024, flux-dev 512)",
    )
    parser.add_argument("--no-t5", action="store_true", help="SD3 without the T5-XXL text encoder")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.architecture = args.architecture or ("sd15" if cuda else "tiny")
    family = FAMILIES[args.architecture]
    for key, value in DEFAULTS[family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


@dataclass
class Row:
    """One measurement: what, under which variant, for how many images, how long, how many FLOPs, peak memory."""

    label: str
    variant: str
    timestep_batch: str
    seconds: float
    flops: float
    memory: float


def measure(
    variant: Variant,
    args: argparse.Namespace,
    device: torch.device,
    compute: torch.dtype,
    flops: dict[str, float],
) -> tuple[list[Row], float, Setup]:
    """Rows of one variant: our sampler, the stock pipeline, training and the epoch per timestep batch.

    FLOPs are counted once (eagerly) and reused: variants run the same operations. Returns the rows,
    our sampler / stock pipeline time, and the setup.
    """
    family = FAMILIES[args.architecture]
    setup = {"sd15": sd15_setup, "sd3": sd3_setup, "sdxl": sdxl_setup, "flux": flux_setup}[family](
        args, device, variant
    )
    policy = setup.policy
    autocast: AbstractContextManager = (
        torch.autocast(device.type, dtype=compute) if compute != torch.float32 else nullcontext()
    )
    precision = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[compute]

    def ours() -> Trajectory:
        with autocast:
            return policy.sample(
                [PROMPT] * args.batch,
                num_steps=args.steps,
                eta=args.eta,
                guidance_scale=args.guidance,
                generator=torch.Generator(device).manual_seed(0),
            )

    def stock() -> Tensor:
        with autocast, torch.no_grad():
            return setup.stock()

    t_ours, mem_ours = timed(ours, device, args.repeats)
    t_stock, mem_stock = timed(stock, device, args.repeats)
    with eager(policy):
        for key, fn in (("ours", ours), ("stock", stock)):
            if key not in flops:
                flops[key] = count_flops(fn)
    algorithm = "GRPO" if family in ("sd3", "flux") else "DDPO"
    group = f", one prompt, group of {args.batch}" if setup.group_size > 1 else ""
    rows = [
        Row("our sampler (latents + log-probs)", variant.label, "-", t_ours, flops["ours"], mem_ours),
        Row(f"stock {setup.stock_name}", variant.label, "-", t_stock, flops["stock"], mem_stock),
    ]
    for timestep_batch in args.timestep_batch:

        def epoch(timestep_batch: int = timestep_batch) -> None:
            run_epoch(setup, args, device, precision, timestep_batch)

        t_epoch, memory = timed(epoch, device, 1)
        key = f"epoch {timestep_batch}"
        if key not in flops:
            with eager(policy):
                flops[key] = count_flops(epoch)
        training = f"{algorithm} training (all {args.steps} steps, train batch {args.train_batch})"
        # the epoch samples exactly one batch like ours: training is the rest
        train_flops = flops[key] - flops["ours"]
        batch = str(timestep_batch)
        rows.append(Row(training, variant.label, batch, max(t_epoch - t_ours, 1e-9), train_flops, memory))
        label = f"{algorithm} epoch (sample + train{group})"
        rows.append(Row(label, variant.label, batch, t_epoch, flops[key], memory))
    return rows, t_ours / t_stock, setup


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute = resolve_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    weights = [resolve_dtype(name) for name in args.weights_dtype] if args.weights_dtype else [compute]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    compiled = [False, True] if args.compile else [False]
    variants = [Variant(dtype, flag) for dtype in weights for flag in compiled]
    rows, ratios, flops, header, notes = [], [], {}, "", []
    for variant in variants:
        variant_rows, ratio, setup = measure(variant, args, device, compute, flops)
        rows += variant_rows
        ratios.append((variant.label, ratio))
        header, notes = setup.header, setup.notes
        del setup  # free the device before building the next variant
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"\n## {args.architecture} on {name}, {compute} compute, batch {args.batch}, {args.steps} steps, {header}, "
        f"torch {torch.__version__}\n"
    )
    print("| measurement | variant | timestep batch | images/s | s per batch | TFLOP/s | MFU | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        tflops = row.flops / row.seconds / 1e12
        mfu = tflops / args.peak_tflops if args.peak_tflops else math.nan
        print(
            f"| {row.label} | {row.variant} | {row.timestep_batch} | {args.batch / row.seconds:.3g} | "
            f"{row.seconds:.3g} | {tflops:.3g} | {mfu:.3g} | {row.memory:.2f} |"
        )
    for note in notes:
        print(f"\n{note}")
    for label, ratio in ratios:
        print(f"\nour sampler / stock pipeline time ({label}): {ratio:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
