"""Sharding a policy's denoiser with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under Lightning's ``ModelParallelStrategy`` (``--trainer.strategy=ModelParallelStrategy`` with
``data_parallel_size`` processes, ``tensor_parallel_size=1``), every training module calls
:func:`shard_denoiser` from ``configure_model``: each block of the denoiser (a UNet's down, mid and
up blocks; a diffusion transformer's ``transformer_blocks`` and FLUX's ``single_transformer_blocks``)
becomes one FSDP unit, and the denoiser itself the root unit holding the rest (embeddings, the final
layers). Frozen base weights and LoRA adapters are sharded alike: each rank holds ``1/N`` of every
parameter as a ``DTensor`` shard, gathers a block's full weights just before the block runs and frees
them after (``reshard_after_forward``), and gradients are reduce-scattered, so every rank's optimiser
updates only its shard. The text encoders, VAE and reward judges are frozen and run once per batch:
they stay whole on every rank (in the dtype the policy gives them), which costs their size per rank
but no communication.

Also here: what every rank holds (:func:`local_numel`), and the collective gathering of sharded
tensors into whole ones (:func:`full_tensor`, :func:`gathered_trained_state`) for exports and checkpoints.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "BLOCK_CONTAINERS",
    "data_parallel_mesh",
    "denoiser_blocks",
    "full_tensor",
    "gathered_trained_state",
    "is_sharded",
    "local_numel",
    "like_parameter",
    "shard_denoiser",
]

BLOCK_CONTAINERS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks")
"""The denoiser attributes whose blocks become FSDP units: a module list's items, or the module itself."""


def denoiser_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The blocks of a diffusers UNet or diffusion transformer that :func:`shard_denoiser` wraps, in order.

    Raises:
        ValueError: the denoiser has none of :data:`BLOCK_CONTAINERS` (the message names its type).
    """
    blocks: list[nn.Module] = []
    for name in BLOCK_CONTAINERS:
        container = getattr(denoiser, name, None)
        if isinstance(container, nn.ModuleList):
            blocks.extend(container)
        elif isinstance(container, nn.Module):
            blocks.append(container)
    if not blocks:
        raise ValueError(
            f"{type(denoiser).__name__} has none of {list(BLOCK_CONTAINERS)}; sharding knows diffusers' UNets and "
            "diffusion transformers (add its block attribute to lightning_sdrl.policies.sharding.BLOCK_CONTAINERS)"
        )
    return blocks


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel mesh of Lightning's ``ModelParallelStrategy`` device mesh.

    Raises:
        ValueError: the mesh has a tensor-parallel dimension larger than 1 (not supported: the error
            names the strategy settings that shard instead).
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        size = mesh.size()
        raise ValueError(
            f"the device mesh has tensor_parallel size {mesh['tensor_parallel'].size()}; lightning_sdrl shards the "
            f"denoiser over data-parallel ranks only: set --trainer.strategy.data_parallel_size={size} "
            "--trainer.strategy.tensor_parallel_size=1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_denoiser(
    denoiser: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> int:
    """Shard ``denoiser`` over ``mesh`` (1-D) with FSDP2: one unit per block, then the root.

    Args:
        denoiser: a diffusers UNet or diffusion transformer (LoRA already applied, trainable
            parameters already float32).
        mesh: the data-parallel device mesh (:func:`data_parallel_mesh`).
        reshard_after_forward: free each block's gathered weights after its forward (memory) rather
            than keeping them until its backward (one all-gather less per block).
        cpu_offload: keep the shards (and their gradients and optimiser state) in CPU memory,
            copying each block's to the accelerator when it runs (``CPUOffloadPolicy``; GPU runs only).

    Returns:
        The number of FSDP units (blocks + 1). Sharding an already sharded denoiser is a no-op
        returning 0.

    Raises:
        ValueError: ``cpu_offload`` on a CPU mesh (the error names the strategy to use).
    """
    if cpu_offload and mesh.device_type == "cpu":
        raise ValueError(
            "cpu_offload moves a GPU run's shards to CPU memory, but this run is on the CPU already; "
            "use --trainer.strategy=fsdp2 (cpu_offload=false) with accelerator cpu"
        )
    if isinstance(denoiser, FSDPModule):
        return 0
    blocks = denoiser_blocks(denoiser)
    options: dict = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(denoiser, **options)
    return len(blocks) + 1


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` shard."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def local_numel(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameter values this rank holds (a ``DTensor``'s local shard; a plain tensor whole)."""
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel()
        for p in module.parameters()
        if p.requires_grad or not trainable_only
    )


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole value of ``tensor`` (all-gathered when it is a ``DTensor``: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like_parameter(value: Tensor, parameter: Tensor) -> Tensor:
    """``value`` (whole) laid out as ``parameter``: its shard when ``parameter`` is a ``DTensor``, else itself.

    Every rank must pass the same ``value`` (the shard is cut locally from it, no communication).
    """
    if not isinstance(parameter, DTensor) or isinstance(value, DTensor):
        return value
    value = value.to(parameter.device)
    return distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)


def gathered_trained_state(denoiser: nn.Module, trainable_only: bool) -> dict[str, Tensor] | None:
    """The whole trained weights of a sharded ``denoiser`` by name, for exports; ``None`` when it is not sharded.

    A collective call (every rank gathers each shard); every rank gets the whole tensors, on the CPU.
    With ``trainable_only`` (LoRA) only the ``requires_grad`` parameters are gathered, so exporting
    adapters never moves the frozen base model; otherwise the full state dict (parameters and
    buffers), as ``torch.distributed.checkpoint``'s ``get_model_state_dict`` assembles it.
    """
    if not is_sharded(denoiser):
        return None
    if trainable_only:
        return {
            name: full_tensor(parameter.detach()).cpu()
            for name, parameter in denoiser.named_parameters()
            if parameter.requires_grad
        }
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    return {name: full_tensor(value).cpu() for name, value in get_model_state_dict(denoiser, options=options).items()}
