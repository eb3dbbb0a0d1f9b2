"""Console progress: one line per training step, and a table for the final summary.

    step 12/40 | reward 0.41 | loss 0.532 | 1.2k tok/s | rollout 0.8s feedback 0.1s teacher 0.3s learner 0.9s sync 0.2s | 1.9 s/step | ETA 0:53

The step time is the wall time between successive lines (stages overlap when generation runs
ahead of training, so the stage times need not add up to it); the ETA is the mean of the recent
step times times the steps left.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from distil_ray.telemetry.metrics import to_float

# Metric names looked up for the line, first match wins (the trainer may or may not prefix them).
REWARD_KEYS = ("reward", "train/reward", "rollout/reward", "rollout/reward_mean")
LOSS_KEYS = ("loss", "train/loss", "learner/loss")
TOKENS_PER_S_KEYS = ("tok_per_s", "throughput/tok_per_s", "rollout/tok_per_s")
# this step's generated tokens, divided by the step's wall time when no rate is given
TOKENS_KEYS = ("tokens", "train/tokens", "rollout/tokens", "rollout/num_tokens", "num_tokens")
STAGE_ORDER = ("rollout", "feedback", "teacher", "learner", "sync")


def format_number(x: float) -> str:
    """Three significant digits: 0.41, 0.532, 12.3, 1.23e-05."""
    if math.isnan(x):
        return "nan"
    return f"{x:.3g}"


def format_count(x: float) -> str:
    """Human-sized rates and counts: 950, 1.2k, 3.4M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= limit:
            return f"{x / limit:.1f}{suffix}"
    return f"{x:.0f}"


def format_seconds(t: float) -> str:
    if t >= 100:
        return f"{t:.0f}s"
    if t >= 1:
        return f"{t:.1f}s"
    return f"{t:.2g}s"


def format_eta(seconds: float) -> str:
    """``0:53``, ``12:05``, ``1:02:03`` (h:mm:ss once over an hour)."""
    seconds = max(0, round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _first(metrics: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        if key in metrics:
            value = to_float(metrics[key])
            if value is not None:
                return value
    return None


class Progress:
    """Formats (and prints) the per-step line. ``clock`` is the time source (seconds)."""

    def __init__(self, total_steps: int, start_step: int = 0, *, window: int = 10,
                 clock: Callable[[], float] = time.monotonic, stream=None):
        self.total_steps = int(total_steps)
        self.last_step = int(start_step)  # a resumed run counts only the steps it runs itself
        self.clock = clock
        self.stream = stream
        self._last_time = clock()
        self._recent: deque[float] = deque(maxlen=window)

    def step_seconds(self) -> float | None:
        """Mean wall time of the recent steps (None before the first line)."""
        return sum(self._recent) / len(self._recent) if self._recent else None

    def eta_seconds(self) -> float | None:
        mean = self.step_seconds()
        return None if mean is None else mean * max(self.total_steps - self.last_step, 0)

    def line(self, step: int, metrics: Mapping[str, Any] | None = None,
             stage_times: Mapping[str, float] | None = None) -> str:
        """The line for a finished ``step`` (1-based count of steps done)."""
        now = self.clock()
        steps_done = max(int(step) - self.last_step, 1)
        elapsed = now - self._last_time
        # several steps since the last line (console_every > 1): each counts with its share
        for _ in range(steps_done):
            self._recent.append(elapsed / steps_done)
        self._last_time, self.last_step = now, int(step)
        this_step = elapsed / steps_done

        metrics = metrics or {}
        parts = [f"step {step}/{self.total_steps}"]
        reward = _first(metrics, REWARD_KEYS)
        if reward is not None:
            parts.append(f"reward {format_number(reward)}")
        loss = _first(metrics, LOSS_KEYS)
        if loss is not None:
            parts.append(f"loss {format_number(loss)}")
        tok_s = _first(metrics, TOKENS_PER_S_KEYS)
        if tok_s is None:
            tokens = _first(metrics, TOKENS_KEYS)
            if tokens is not None and this_step > 0:
                tok_s = tokens / this_step
        if tok_s is not None:
            parts.append(f"{format_count(tok_s)} tok/s")
        if stage_times:
            known = [k for k in STAGE_ORDER if k in stage_times]
            others = [k for k in stage_times if k not in STAGE_ORDER]
            parts.append(" ".join(f"{k} {format_seconds(float(stage_times[k]))}" for k in known + others))
        mean = self.step_seconds()
        if mean is not None:
            parts.append(f"{mean:.1f} s/step")
            parts.append(f"ETA {format_eta(self.eta_seconds())}")
        return " | ".join(parts)

    def print(self, step: int, metrics: Mapping[str, Any] | None = None,
              stage_times: Mapping[str, float] | None = None) -> str:
        text = self.line(step, metrics, stage_times)
        stream = self.stream if self.stream is not None else sys.stdout
        print(text, file=stream, flush=True)
        return text


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (str, bool)):
        return str(value)
    if not isinstance(value, (int, float)):
        f = to_float(value)  # numpy / torch scalars
        if f is None:
            return str(value)
        value = f
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per mapping, columns in first-seen order (or ``columns``);
    numbers right-aligned with four significant digits, missing cells shown as ``-``."""
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(str(c))] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def fmt(values, header=False):
        out = []
        for i, v in enumerate(values):
            right = not header and _looks_numeric(v)
            out.append(v.rjust(widths[i]) if right else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(columns, header=True), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text in ("nan", "inf", "-inf")
