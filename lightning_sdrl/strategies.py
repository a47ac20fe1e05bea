"""Sharded training through Lightning: ``ModelParallelStrategy`` set up for FSDP2 over all ranks.

``--trainer.strategy=fsdp2 --trainer.devices=8`` (the name this module registers with Lightning's
``StrategyRegistry``; importing ``lightning_sdrl.cli`` registers it) shards the policy's
denoiser over the 8 ranks (every training module's ``configure_model`` calls
:func:`~lightning_sdrl.policies.sharding.shard_denoiser`): each rank holds 1/8 of the denoiser, of its
gradients and of the optimiser state. It is Lightning's ``ModelParallelStrategy`` with two
differences:

- the data-parallel size defaults to every process of every node and the tensor-parallel size is 1
  (the parent's defaults put all of a node's processes on tensor parallelism, which these models
  are not written for);
- a sharded checkpoint may hold only the trainable weights (the modules' ``checkpoint_trainable_only``,
  the default: a LoRA run's checkpoint is the adapters and the optimiser state, not the frozen base
  model, which reloads from its source): it resumes and validates by loading exactly the weights it
  holds, and the module's ``on_load_checkpoint`` receives their names under ``"state_dict"``, so a
  checkpoint of another model is still refused by name (the parent requires every weight of the
  model in the checkpoint).

Checkpoints are folders written by ``torch.distributed.checkpoint`` (every rank writes its shards,
Lightning's ``meta.pt`` holds the rest) and resume on the same or another number of ranks;
``save_distributed_checkpoint=False`` writes one gathered file instead.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as checkpoint_load
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["STRATEGY_NAME", "FSDP2Strategy", "saved_weight_names"]

METADATA_FILE = "meta.pt"
"""Lightning's file of a sharded checkpoint's non-tensor entries (epoch, loops, callbacks, module extras)."""


def saved_weight_names(path: str | Path) -> set[str]:
    """The module weight names a sharded checkpoint folder holds (its ``state_dict.`` entries, prefix removed)."""
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "state_dict."
    return {key[len(prefix) :] for key in keys if key.startswith(prefix)}


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every rank (data-parallel sharding, no tensor parallelism), resuming trainable-only checkpoints.

    Args:
        data_parallel_size: ranks the denoiser is sharded over; ``"auto"``: all (nodes x devices).
        cpu_offload: keep the denoiser's shards, gradients and optimiser state in CPU memory, each
            block's copied to the GPU when it runs (FSDP2's ``CPUOffloadPolicy``; the name
            ``fsdp2_cpu_offload`` selects it).
        reshard_after_forward: free each block's gathered weights after its forward pass (memory)
            instead of keeping them for its backward pass (one all-gather less per block).
        save_distributed_checkpoint: write sharded checkpoint folders (``True``) or one gathered file.
        process_group_backend: ``"nccl"`` on GPUs, ``"gloo"`` on CPUs (default: by device).
        timeout: of collective operations.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: datetime.timedelta | None = datetime.timedelta(seconds=1800),
    ) -> None:
        self.cpu_offload, self.reshard_after_forward = cpu_offload, reshard_after_forward
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        """Set the data-parallel size to the world size when it is ``"auto"``, then build the mesh."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the weights and optimiser states a sharded checkpoint holds; other checkpoints as the parent does.

        Returns:
            The checkpoint's other entries, with ``"state_dict"`` holding the loaded weights by name.
        """
        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / METADATA_FILE).is_file()):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        assert self.model is not None
        saved = saved_weight_names(path)
        weights = {name: value for name, value in get_model_state_dict(self.model).items() if name in saved}
        checkpoint_load({"state_dict": weights}, checkpoint_id=str(path))
        set_model_state_dict(self.model, weights, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(self.model, optimizer)}
            checkpoint_load(state, checkpoint_id=str(path))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[key])
        metadata = torch.load(path / METADATA_FILE, weights_only=weights_only)
        metadata["state_dict"] = weights
        return metadata


STRATEGY_NAME = "fsdp2"
"""``--trainer.strategy=fsdp2``: :class:`FSDP2Strategy` with its defaults."""

if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY_NAME, FSDP2Strategy, description="lightning_sdrl: FSDP2 sharding of the denoiser over every rank"
    )
    StrategyRegistry.register(
        f"{STRATEGY_NAME}_cpu_offload",
        FSDP2Strategy,
        description="lightning_sdrl: FSDP2 sharding with the shards and optimiser state in CPU memory",
        cpu_offload=True,
    )
