"""The metrics log of a run: ``metrics.csv`` in the run's own folder, continued on a resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _RunWriter(ExperimentWriter):
    """Lightning's CSV writer that replaces an old ``metrics.csv`` quietly, or continues it.

    With ``append`` the existing file's rows and columns are kept and new rows added below.
    """

    def __init__(self, log_dir: str, append: bool) -> None:
        self.append = append
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if not self.append:
            path.unlink()
            return
        with path.open(newline="") as file:
            header = next(csv.reader(file), [])
        self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """CSV metrics (``metrics.csv``) and ``hparams.yaml`` directly in the run's folder.

    Unlike Lightning's ``CSVLogger`` it keeps ``trainer.log_dir`` at ``save_dir`` itself (no
    ``lightning_logs/version_N`` below it), so the run's grids, summaries, trained weights,
    ``checkpoints/`` and metrics sit side by side, and it writes every logged row at once
    (``flush_logs_every_n_steps=1``). DDPO logs one row per DDPO epoch.

    Args:
        save_dir: the run's folder. ``None``: the command line fills in ``trainer.default_root_dir``
            (elsewhere it is the current directory).
        append: continue an existing ``metrics.csv`` (a resumed run; the command line sets it when
            ``--ckpt_path`` is given) instead of starting a new one.
        flush_logs_every_n_steps: rows kept in memory before they are written.
    """

    def __init__(self, save_dir: str | None = None, append: bool = False, flush_logs_every_n_steps: int = 1) -> None:
        super().__init__(
            save_dir if save_dir is not None else os.getcwd(),
            name="",
            version="",
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )
        self.append = append

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer (created on first use, on global rank zero)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RunWriter(self.log_dir, self.append)
        return self._experiment
