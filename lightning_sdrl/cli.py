"""Command line: ``python -m lightning_sdrl fit -c configs/ddpo.yaml`` (LightningCLI).

Any LightningModule / LightningDataModule of the package (or of the user's code) is selected with
``class_path`` in the config; ``--print_config`` shows every option with its default, and
Lightning's own flags (``--trainer.strategy=ddp --trainer.devices=N``, ``--trainer.precision``)
work as usual. Unknown keys are an error that names them.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI with ``args`` (default: ``sys.argv[1:]``)."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
