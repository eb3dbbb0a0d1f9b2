"""Run metrics: one JSON object per step in ``run_dir/metrics.jsonl``, and wandb when asked for.

The JSONL file is the record of a run: it is flushed after every line, so a crashed or killed run
keeps every step it finished, and ``read_metrics`` reads it back (plots, resume, tests). Values are
converted to plain floats (numpy and torch scalars included); NaN and ±inf, which JSON cannot
hold, are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` and read back as floats.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_float(value: Any) -> float | None:
    """A plain float from a Python / numpy / torch scalar (or one-element array); None if it is not one."""
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        return float(value)
    item = getattr(value, "item", None)  # numpy and torch scalars, one-element arrays and tensors
    if callable(item):
        numel = getattr(value, "numel", None)  # torch: numel(); numpy: .size
        size = numel() if callable(numel) else getattr(value, "size", 1)
        if size != 1:
            return None
        try:
            out = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        if isinstance(out, numbers.Real):
            return float(out)
    return None


def plain_config(config: Any) -> dict:
    """A plain nested dict of a run config: a dataclass (``RunConfig``), an OmegaConf node or a mapping."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:
        pass
    return dict(config)


def _encode(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class MetricsLogger:
    """``log(step, metrics)`` appends ``{"step": step, **metrics}`` to ``run_dir/metrics.jsonl``.

    ``config`` (a ``RunConfig``, an OmegaConf node or a dict) is what wandb records for the run.
    ``wandb=True`` also sends the metrics to Weights & Biases (``mode`` offline by default, so
    nothing leaves the machine unless asked) when the package is importable; otherwise a warning
    is logged once and the JSONL file remains the record. A value that is not a number (a string,
    a list) is skipped with a one-time warning naming the key rather than failing a long run.
    """

    def __init__(self, run_dir, *, wandb: bool = False, project: str = "distil_ray", mode: str = "offline",
                 config: Mapping[str, Any] | None = None, rewind_to: int | None = None, name: str | None = None,
                 group: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if rewind_to is not None and self.path.is_file():
            self._rewind(int(rewind_to))
        # Append: a resumed run continues the same file.
        self._file = open(self.path, "a", encoding="utf-8")
        self._skipped: set[str] = set()
        self._wandb_run = None
        if wandb and mode != "disabled":
            self._wandb_run = self._start_wandb(project, mode, plain_config(config), name or self.run_dir.name, group)

    def wandb_run_id(self) -> str:
        """The run's wandb id, made once and kept in the run directory: a resumed run (same run
        directory) continues the same wandb run instead of starting a new one."""
        path = self.run_dir / WANDB_ID_FILE
        if not path.is_file():
            import secrets

            path.write_text(secrets.token_hex(8))
        return path.read_text().strip()

    def _start_wandb(self, project: str, mode: str, config: dict, name: str, group: str | None):
        try:
            import wandb as wandb_lib
        except ImportError:
            logger.warning("logging.wandb=true but the wandb package is not installed; metrics go to %s only", self.path)
            return None
        return wandb_lib.init(project=project, mode=mode, config=config, dir=str(self.run_dir), name=name,
                              group=group, id=self.wandb_run_id(), resume="allow")

    def rewind(self, step: int) -> None:
        """Drop what was logged after ``step``, while the file is open (a resumed run, once its
        checkpoint has loaded)."""
        self._file.close()
        self._rewind(int(step))
        self._file = open(self.path, "a", encoding="utf-8")

    def _rewind(self, step: int) -> None:
        """Drop the lines logged after ``step`` (a run resumed from that step's checkpoint redoes
        them); the file is replaced whole, so a crash here leaves the old one."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) > step:
                    continue
            except (ValueError, AttributeError):
                continue  # a torn last line of a killed run
            kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Write one line; returns the float values that were written (non-numbers dropped)."""
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            f = to_float(value)
            if f is None:
                if key not in self._skipped:
                    self._skipped.add(key)
                    logger.warning("metric %r has a non-numeric value of type %s; it is not logged",
                                   key, type(value).__name__)
                continue
            clean[str(key)] = f
        record = {"step": int(step), **{k: _encode(v) for k, v in clean.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(clean, step=int(step))
        return clean

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows of text (e.g. generations) as a wandb table; the JSON-lines files hold them too."""
        if self._wandb_run is None or not rows:
            return
        import wandb as wandb_lib

        columns = list(rows[0])
        table = wandb_lib.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self._wandb_run.log({key: table}, step=int(step))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` (a file, or the run directory holding one), in order.

    Non-finite values come back as floats; a truncated last line (a run killed mid-write) is ignored.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the unterminated last line of a killed run
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON object line") from None
        records.append({k: (_NON_FINITE[v] if isinstance(v, str) and v in _NON_FINITE else v)
                        for k, v in record.items()})
    return records
