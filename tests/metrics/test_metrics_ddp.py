"""Each metric updated by 2 gloo processes, each with half the data, equals the 1-process value."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_sdrl.metrics.attribute_bias import AttributeBias
from lightning_sdrl.metrics.attribute_kl import AttributeKL
from lightning_sdrl.metrics.fid import FID
from lightning_sdrl.metrics.precision_recall import PrecisionRecall

WORLD_SIZE = 2


def tiny_extractor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, kernel_size=3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "real": torch.rand(24, 3, 6, 6, generator=generator),
        "fake": torch.rand(20, 3, 6, 6, generator=generator) * 0.8,
        "probs": torch.softmax(torch.randn(30, 3, generator=generator), dim=1),
    }


def new_metrics() -> dict:
    return {
        "fid": FID(tiny_extractor(), num_features=5),
        "prc": PrecisionRecall(tiny_extractor(), k=3),
        "kl": AttributeKL(num_classes=3),
        "bias": AttributeBias(num_classes=3),
    }


def run_metrics(batches: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    metrics = new_metrics()
    for image_metric in (metrics["fid"], metrics["prc"]):
        for batch in batches["real"]:
            image_metric.update(batch, real=True)
        for batch in batches["fake"]:
            image_metric.update(batch, real=False)
    for batch in batches["probs"]:
        metrics["kl"].update(batch)
        metrics["bias"].update(batch)
    prc = metrics["prc"].compute()
    return {
        "fid": metrics["fid"].compute(),
        "precision": prc["precision"],
        "recall": prc["recall"],
        "kl": metrics["kl"].compute(),
        "bias": metrics["bias"].compute(),
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        halves = {name: tensor.chunk(WORLD_SIZE)[rank] for name, tensor in data().items()}
        # rank 0 updates in several batches, rank 1 in one: list states of different lengths
        batches = {name: list(half.split(5 if rank == 0 else len(half))) for name, half in halves.items()}
        torch.save(run_metrics(batches), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_equals_single_process(tmp_path):
    # fork: the children inherit the imported modules instead of importing torchmetrics again
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="fork")
    expected = run_metrics({name: [tensor] for name, tensor in data().items()})
    for rank in range(WORLD_SIZE):
        values = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.items():
            torch.testing.assert_close(values[name], value, rtol=1e-9, atol=1e-12, msg=f"rank {rank} {name}")
