"""Command line: ``lightning-sdrl fit -c configs/ddpo.yaml`` (or ``python -m lightning_sdrl``), a LightningCLI.

Any LightningModule / LightningDataModule of the package (or of the user's code) is selected with
``class_path`` in the config; the package's own classes also by their class name alone
(``--model DDPOModule``, ``--model.help DDPOModule``, ``--data SamplingDataModule``).
``--print_config`` shows every option with its default, and Lightning's own flags
(``--trainer.strategy=ddp --trainer.devices=N``, ``--trainer.precision``) work as usual. Unknown keys
are an error that names them.

One option is the CLI's own, ``--cpu_threads`` (``auto`` or a positive integer): the number of
threads torch uses for its CPU operations, set before any model is built. ``auto`` is
``$OMP_NUM_THREADS`` when that is set, else the CPUs this process may run on (its affinity mask,
capped by the cgroup CPU quota). On a machine shared with other jobs, ``--cpu_threads 1`` avoids
oversubscribing the cores.

Two entry points: :func:`main` is the console script ``lightning-sdrl``: it returns nothing, so a
successful run exits 0, and an error raised while the config's classes are built prints our own
message last and exits 2. :func:`run_cli` returns the :class:`~lightning.pytorch.cli.LightningCLI`
object (for tests and benchmarks) and re-raises such an error as the original exception.

``lightning-sdrl serve-reward -c reward.yaml`` serves a reward over HTTP instead of training
(:mod:`lightning_sdrl.reward_server`; its config holds ``reward:``, ``host``, ``port``, ``device``).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NoReturn

import jsonargparse
import lightning
import torch
from jsonargparse.typing import PositiveInt
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

CLASS_MODULES = (
    "lightning_sdrl.modules.ddpo",
    "lightning_sdrl.modules.grpo",
    "lightning_sdrl.modules.nft",
    "lightning_sdrl.modules.awm",
    "lightning_sdrl.modules.refl",
    "lightning_sdrl.modules.reward_model",
    "lightning_sdrl.modules.pretrain",
    "lightning_sdrl.data.sampling",
    "lightning_sdrl.data.imagereward_db",
    "lightning_sdrl.policies",
    "lightning_sdrl.rewards.aesthetic",
    "lightning_sdrl.rewards.attribute",
    "lightning_sdrl.rewards.classifiers",
    "lightning_sdrl.rewards.combination",
    "lightning_sdrl.rewards.diversity",
    "lightning_sdrl.rewards.hps",
    "lightning_sdrl.rewards.image_reward",
    "lightning_sdrl.rewards.pickscore",
    "lightning_sdrl.rewards.remote",
    "lightning_sdrl.rewards.reward_model",
    "lightning_sdrl.rewards.simple",
    "lightning_sdrl.rewards.vlm_judge",
    "lightning_sdrl.callbacks",
    "lightning_sdrl.strategies",
)
"""Modules imported with the CLI: jsonargparse then knows their classes as subclasses of the
annotated base classes, so that a class name alone selects them or shows their help
(``lightning_sdrl.strategies`` registers ``--trainer.strategy=fsdp2``). The digits
miniature (:mod:`lightning_sdrl.digits`) is not among them: its configs give full class paths."""

for _name in CLASS_MODULES:
    importlib.import_module(_name)

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2 CPU quota of this process's container: ``"<quota> <period>"`` in microseconds, or
``"max <period>"`` for no limit."""

QUIET_WARNINGS = (
    # The package freezes rewards, classifiers and reference policies in eval mode on purpose.
    (PossibleUserWarning, r"Found \d+ module\(s\) in eval mode at the start of training"),
    # The package's IterableDatasets have a length (the batches of one epoch) and are iterated in
    # the main process, where that length is exact.
    (UserWarning, r"Your `IterableDataset` has `__len__` defined"),
    # Lightning's own use of a torch API that torch deprecated; nothing a user can change.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # diffusers passes an argument huggingface_hub deprecated, on every model it loads.
    (UserWarning, r"The `local_dir_use_symlinks` argument is deprecated"),
    # run_cli(args) / main(args) parse ``args`` alone, by design; sys.argv is the calling script's.
    (UserWarning, r"LightningCLI's args parameter is intended to run from within Python"),
)
"""Warnings of Lightning and torch that every run would print and no user action silences:
``(category, message regex)``, ignored while the CLI runs."""

QUIET_INFO_PREFIXES = ("💡 Tip:",)
"""Starts of Lightning's info lines that the CLI drops (an advertisement for a cloud logger)."""

_LIGHTNING_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"

EXIT_CONFIG_ERROR = 2
"""Exit status of :func:`main` when a class of the config rejects its arguments (argparse's
status for a usage error)."""


def available_cpus(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The number of CPUs this process may use: its affinity mask, capped by the cgroup CPU quota.

    Args:
        cgroup_cpu_max: the cgroup v2 ``cpu.max`` file; a missing file or ``max`` means no quota.

    Returns:
        At least 1. A quota of 1.5 CPUs counts as 2.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 quota file, or one this function cannot read
        pass
    return max(1, cpus)


def resolve_cpu_threads(cpu_threads: int | Literal["auto"], cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The torch thread count that ``--cpu_threads`` asks for.

    Args:
        cpu_threads: a positive number of threads, or ``"auto"``: ``$OMP_NUM_THREADS`` when it is
            set, else :func:`available_cpus`.
        cgroup_cpu_max: passed to :func:`available_cpus`.

    Returns:
        The number of threads, at least 1.

    Raises:
        ValueError: for a ``cpu_threads`` or ``$OMP_NUM_THREADS`` that is not a positive integer.
    """
    if cpu_threads == "auto":
        # OpenMP also accepts a list for nested levels ("4,2"); the first entry is the outer level
        from_env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        if not from_env:
            return available_cpus(cgroup_cpu_max)
        if not (from_env.isdigit() and int(from_env) >= 1):
            raise ValueError(
                f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']!r} with cpu_threads='auto'; set OMP_NUM_THREADS "
                "to a positive integer, unset it, or pass --cpu_threads N"
            )
        return int(from_env)
    if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1:
        raise ValueError(f"cpu_threads={cpu_threads!r}; expected a positive integer or 'auto'")
    return cpu_threads


def _library_dirs() -> tuple[str, ...]:
    """Folders of the libraries whose frames a config error leaves out: jsonargparse and Lightning."""
    return tuple(str(Path(package.__file__).parent) for package in (jsonargparse, lightning))


def _inner(error: BaseException) -> BaseException | None:
    """The exception ``error`` was raised from, or while handling; ``None`` if neither."""
    return error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def config_error_cause(error: BaseException) -> BaseException:
    """The outermost exception of ``error``'s chain raised outside jsonargparse and Lightning.

    jsonargparse wraps an error raised by a class of the config in its own ``ValueError`` (which
    lists every member of a ``Union`` it tried); the error to show is the one the class raised.
    ``error`` itself if every exception of the chain was raised inside those libraries.
    """
    libraries, seen, current = _library_dirs(), set(), error
    while current is not None and id(current) not in seen:
        frames = traceback.extract_tb(current.__traceback__)
        if frames and not frames[-1].filename.startswith(libraries):
            return current
        seen.add(id(current))
        current = _inner(current)
    return error


class _DropInfo(logging.Filter):
    """Drops log records whose message starts with one of :data:`QUIET_INFO_PREFIXES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_INFO_PREFIXES)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence :data:`QUIET_WARNINGS` and :data:`QUIET_INFO_PREFIXES` inside the block."""
    logger = logging.getLogger(_LIGHTNING_RANK_ZERO_LOGGER)
    drop = _DropInfo()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for category, message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        logger.removeFilter(drop)


def format_config_error(error: BaseException) -> str:
    """``error``'s traceback without the frames of jsonargparse and Lightning, its message last.

    Example:
        >>> print(format_config_error(ValueError("lora rank=0; expected >= 1")))
        ValueError: lora rank=0; expected >= 1
    """
    libraries = _library_dirs()
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith(libraries)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
    lines += traceback.format_exception_only(type(error), error)
    return "".join(lines).rstrip("\n")


RUN_LOGGER = "lightning_sdrl.loggers.RunCSVLogger"


def fill_run_logger(trainer: jsonargparse.Namespace, ckpt_path: str | None) -> None:
    """Point the config's :class:`~lightning_sdrl.loggers.RunCSVLogger` at the run's folder.

    Without a ``save_dir`` it logs into ``trainer.default_root_dir``, and it continues its
    ``metrics.csv`` when a checkpoint is resumed.
    """
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, jsonargparse.Namespace) and logger.get("class_path") == RUN_LOGGER:
            if logger.init_args.get("save_dir") is None:
                logger.init_args.save_dir = str(trainer.get("default_root_dir") or os.getcwd())
            if ckpt_path is not None:
                logger.init_args.append = True


def check_ckpt_path(ckpt_path: str | None) -> None:
    """Raise a clear error for a ``--ckpt_path`` that is not a Lightning checkpoint.

    The trained LoRA of a run (``<log_dir>/trained``) is the usual mistake: torch cannot unpickle a
    safetensors file, and a folder is no file at all.
    """
    if ckpt_path is None or ckpt_path in ("best", "last", "hpc", "registry") or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path)
    if is_sharded_checkpoint(path):  # a distributed checkpoint (ModelParallelStrategy): a folder
        return
    trained = path.is_dir() or path.suffix == ".safetensors"
    if trained or (path.is_file() and not _is_torch_checkpoint(path)):
        what = "a trained-weights folder or file (save_trained)" if trained else "not a Lightning checkpoint"
        raise ValueError(
            f"--ckpt_path {ckpt_path} is {what}; pass a checkpoint written during fit, e.g. "
            "<log_dir>/checkpoints/last.ckpt. To use trained LoRA weights, load them into the policy: "
            "policy.load_trained('<log_dir>/trained')"
        )


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (torch's distributed checkpoint + ``meta.pt``)."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def _is_torch_checkpoint(path: Path) -> bool:
    """Whether ``path`` starts like a file of ``torch.save`` (a zip archive, or a legacy pickle)."""
    with path.open("rb") as file:
        head = file.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


class SDRLCLI(LightningCLI):
    """The package's LightningCLI: any LightningModule and LightningDataModule, plus ``--cpu_threads``.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``).
        exit_on_config_error: when a class of the config raises while it is built, print the
            error (our frames and message, without jsonargparse's dump of every Union member it
            tried) to stderr and exit with :data:`EXIT_CONFIG_ERROR`; ``False`` re-raises the
            original exception.
    """

    def __init__(self, args: list[str] | None = None, exit_on_config_error: bool = False) -> None:
        self.exit_on_config_error = exit_on_config_error
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--cpu_threads``."""
        parser.add_argument(
            "--cpu_threads",
            type=PositiveInt | Literal["auto"],
            default="auto",
            help="threads torch uses on the CPU: a positive integer, or auto ($OMP_NUM_THREADS if set, else the "
            "CPUs available to this process). On a shared machine, 1 avoids oversubscription.",
        )

    def before_instantiate_classes(self) -> None:
        """Set torch's thread count before any model is built; point a run logger at the run's folder."""
        config = self.config.get(str(self.subcommand), self.config)
        torch.set_num_threads(resolve_cpu_threads(config.cpu_threads))
        if "trainer" in config:
            fill_run_logger(config.trainer, config.get("ckpt_path"))

    def instantiate_classes(self) -> None:
        """Build the config's classes; an error they raise comes out as itself (see ``exit_on_config_error``)."""
        try:
            config = self.config.get(str(self.subcommand), self.config)
            check_ckpt_path(config.get("ckpt_path"))
            super().instantiate_classes()
        except Exception as error:
            raise_config_error(error, self.exit_on_config_error)


def raise_config_error(error: Exception, exit_on_config_error: bool) -> NoReturn:
    """Re-raise the error a class of the config raised while it was built, or print it and exit.

    Args:
        error: What building the classes raised (maybe jsonargparse's wrapper of the class's error).
        exit_on_config_error: print the class's error (see :func:`format_config_error`) to stderr
            and exit with :data:`EXIT_CONFIG_ERROR`; ``False`` re-raises it as itself.
    """
    cause = config_error_cause(error)
    if exit_on_config_error:
        print(format_config_error(cause), file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    if cause is error:
        raise error
    # the error the class raised, chained to what it was raised from, not jsonargparse's wrapper
    raise cause from _inner(cause)


def run_cli(args: list[str] | None = None) -> SDRLCLI:
    """Run the CLI with ``args`` (default: ``sys.argv[1:]``) and return it, for its trainer, model and data.

    Raises:
        Exception: the error a class of the config raised while it was built, as itself.
    """
    with quiet_lightning():
        return SDRLCLI(args)


def main(args: list[str] | None = None) -> None:
    """The ``lightning-sdrl`` console script: run the CLI with ``args`` (default: ``sys.argv[1:]``).

    ``serve-reward ...`` runs :func:`serve_reward_command` instead of the LightningCLI. Exits with
    status :data:`EXIT_CONFIG_ERROR` after printing the error when a class of the config rejects
    its arguments; returns ``None`` otherwise, so a successful run exits 0.
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == [SERVE_REWARD]:
        serve_reward_command(argv[1:], exit_on_config_error=True)
        return
    with quiet_lightning():
        SDRLCLI(args, exit_on_config_error=True)


SERVE_REWARD = "serve-reward"
"""The subcommand that serves a reward over HTTP (:mod:`lightning_sdrl.reward_server`)."""


def serve_reward_command(args: list[str], exit_on_config_error: bool = False) -> None:
    """``lightning-sdrl serve-reward -c reward.yaml [--port 8000 ...]``: build the config's reward and serve it.

    Args:
        args: The arguments after ``serve-reward`` (``--help``, ``--print_config``, ``--reward.help CLASS``
            work as for ``fit``; unknown keys are an error naming them).
        exit_on_config_error: as :class:`SDRLCLI`'s: print the reward's error and exit with
            :data:`EXIT_CONFIG_ERROR` when it rejects its arguments; ``False`` re-raises it.
    """
    try:
        from lightning_sdrl.reward_server import reward_server_parser, serve_reward  # fastapi only when serving
    except ModuleNotFoundError as error:
        if error.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        raise ModuleNotFoundError(
            f"serve-reward needs {error.name}, which is not installed: pip install fastapi uvicorn "
            "(or pip install 'lightning_sdrl[serve]'); training against a server (RemoteReward) does not"
        ) from error

    parser = reward_server_parser()
    config = parser.parse_args(args)
    try:
        built = parser.instantiate_classes(config)
    except Exception as error:
        raise_config_error(error, exit_on_config_error)
    serve_reward(built.reward, host=built.host, port=built.port, device=built.device, log_level=built.log_level)
