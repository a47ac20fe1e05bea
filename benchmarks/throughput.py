"""Sampling and DDPO training throughput, FLOP rate and peak memory.

Compares, at equal settings, our sampler (which keeps every latent and step log-prob) with the
stock ``StableDiffusionPipeline`` call on the same UNet/VAE/text encoder, and times a DDPO epoch
(sampling + PPO updates over every timestep) through the real ``DDPOModule`` and a Lightning
``Trainer``. Weights are random (time does not depend on their values), so nothing is downloaded.

    python benchmarks/throughput.py                       # CPU: tiny components
    python benchmarks/throughput.py --architecture sd15   # CUDA: SD1.5 architecture at 512x512

Prints one table; figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import lightning.pytorch as pl
import torch
from diffusers import StableDiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode

from lightning_sdrl.data.sampling import SamplingDataModule
from lightning_sdrl.modules.ddpo import DDPOModule
from lightning_sdrl.policies import LoRASettings, RandomTextToImagePolicy
from lightning_sdrl.rewards.simple import Brightness


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls after one warm-up."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default=None, help="tiny | sd15 (default: sd15 on CUDA, tiny on CPU)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    architecture = args.architecture or ("sd15" if device.type == "cuda" else "tiny")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    policy = RandomTextToImagePolicy(architecture, lora=LoRASettings(rank=4)).to(device)
    for module in (policy.text_encoder, policy.vae):
        module.to(dtype)
    prompts = ["a photo of a cat"] * args.batch
    settings = dict(num_steps=args.steps, eta=args.eta, guidance_scale=args.guidance)
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
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def ours():
        with autocast:
            return policy.sample(prompts, generator=torch.Generator(device).manual_seed(0), **settings)

    def stock():
        with autocast, torch.no_grad():
            return pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                eta=args.eta,
                output_type="pt",
                generator=torch.Generator(device).manual_seed(0),
            ).images

    t_ours, trajectory = timed(ours, device, args.repeats)
    t_stock, _ = timed(stock, device, args.repeats)
    flops_sample = count_flops(ours)

    precision = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[dtype]

    def ddpo_epoch() -> None:
        module = DDPOModule(
            policy,
            Brightness(),
            train_batch_size=args.train_batch,
            sample_grid_every_n_epochs=0,
            save_trained_on_end=False,
            **settings,
        )
        data = SamplingDataModule(prompts=prompts[:1], batch_size=args.batch, num_batches_per_epoch=1)
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
        trainer.fit(module, data)

    t_epoch, _ = timed(ddpo_epoch, device, 1)
    t_train = max(t_epoch - t_ours, 1e-9)

    def train_flops_fn() -> None:
        rows = torch.arange(min(args.train_batch, len(trajectory)))
        sub = trajectory.select(rows)
        with autocast:
            log_prob, _ = policy.step_log_prob(sub, torch.zeros(len(sub), dtype=torch.long), args.eta, args.guidance)
        log_prob.sum().backward()

    flops_train = count_flops(train_flops_fn) * args.steps * (args.batch / min(args.train_batch, args.batch))
    policy.zero_grad(set_to_none=True)

    mem_ours = peak_memory(ours, device)
    mem_stock = peak_memory(stock, device)
    mem_epoch = peak_memory(ddpo_epoch, device)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"\n## {architecture} on {name}, {dtype}, batch {args.batch}, {args.steps} steps, CFG {args.guidance}, "
        f"eta {args.eta}, LoRA rank 4, torch {torch.__version__}\n"
    )
    print("| measurement | images/s | s per batch | TFLOP/s | peak GiB |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| our sampler (latents + log-probs) | {args.batch / t_ours:.2f} | {t_ours:.2f} | "
        f"{flops_sample / t_ours / 1e12:.1f} | {mem_ours:.2f} |"
    )
    print(
        f"| stock StableDiffusionPipeline | {args.batch / t_stock:.2f} | {t_stock:.2f} | "
        f"{flops_sample / t_stock / 1e12:.1f} | {mem_stock:.2f} |"
    )
    print(
        f"| DDPO training (all {args.steps} steps, train batch {args.train_batch}) | "
        f"{args.batch / t_train:.2f} | {t_train:.2f} | {flops_train / t_train / 1e12:.1f} | {mem_epoch:.2f} |"
    )
    print(
        f"| DDPO epoch (sample + train) | {args.batch / t_epoch:.2f} | {t_epoch:.2f} | "
        f"{(flops_sample + flops_train) / t_epoch / 1e12:.1f} | {mem_epoch:.2f} |"
    )
    print(f"\nour sampler / stock pipeline time: {t_ours / t_stock:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
