"""``python -m lightning_sdrl`` runs the LightningCLI (see :mod:`lightning_sdrl.cli`)."""

from lightning_sdrl.cli import main

if __name__ == "__main__":
    main()
