"""Rank-0 reporting: one logger, metrics.jsonl, TensorBoard events, a progress bar with ETA."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

LOGGER_NAME = "polar_train"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the moment
    the handler was made: a caller that swaps stderr (pytest's capture, a tool embedding the CLI)
    and closes the old one must not turn later log lines into "--- Logging error ---" tracebacks."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(log_file: Path | None = None, rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Console (rank 0 only) and an optional log file; safe to call twice."""
    log = logging.getLogger(LOGGER_NAME)
    log.setLevel(level)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if rank == 0:
        console = _StderrHandler()
        console.setFormatter(fmt)
        log.addHandler(console)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(fmt)
            log.addHandler(fh)
    else:
        log.addHandler(logging.NullHandler())
    return log


class MetricsWriter:
    """Appends one JSON object per event to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: Path, enabled: bool = True, resumed_at: int = 0):
        """``resumed_at``: the step a resumed run continues from; TensorBoard events written
        after it by the interrupted run are purged (metrics.jsonl comes back from the checkpoint)."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = out_dir / "metrics.jsonl"
        self.file = self.path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)
        except ImportError:  # tensorboard is a dependency; a broken install only loses the events
            logging.getLogger(LOGGER_NAME).warning("tensorboard not importable: no TensorBoard events")

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def format_metrics(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    """``loss 0.6931 | accuracy 0.5`` for the keys present, in the given order."""
    return " | ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
