"""Figures of runs, from their ``metrics.jsonl``: validation over steps and wall-clock, training
reward, loss and throughput, several runs overlaid (``report --plot``), and mean ± std bands over
seeds (``distil_ray.replicate``).

Wall-clock (``report --plot``) is the run's own time line: start-up, then every step, evaluation and
checkpoint as the run logged them, summed in order, each point at the end of its line (a resumed
run adds its second start-up). ``distil_ray.replicate`` compares algorithms on training time
instead: start-up left out, each evaluation at the time it started.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

_TIME_KEYS = ("time/startup_s", "time/step_s", "time/eval_s", "time/checkpoint_s")
_AT_K = re.compile(r"^val/(?:(?P<group>domain/[^/]+)/)?(?P<metric>best|maj)@(?P<k>\d+)$")


def wall_clock(lines: Sequence[Mapping]) -> list[float]:
    """Seconds since the run started at the end of each line (cumulative logged durations)."""
    total, out = 0.0, []
    for line in lines:
        total += sum(float(line.get(k, 0.0)) for k in _TIME_KEYS)
        out.append(total)
    return out


def series(lines: Sequence[Mapping], key: str) -> tuple[list[int], list[float], list[float]]:
    """``(steps, wall-clock seconds, values)`` of every line that has ``key``."""
    wall = wall_clock(lines)
    rows = [(int(line["step"]), w, float(line[key])) for line, w in zip(lines, wall)
            if key in line and isinstance(line[key], (int, float)) and not math.isnan(float(line[key]))]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def at_k_keys(lines: Sequence[Mapping]) -> dict[str, list[str]]:
    """The largest-k ``best@k`` and ``maj@k`` validation keys, overall and per domain:
    ``{"best": ["val/best@16", "val/domain/chemistry/best@16", ...], "maj": [...]}``."""
    largest: dict[tuple[str, str | None], int] = {}
    for line in lines:
        for key in line:
            m = _AT_K.match(key)
            if m:
                slot = (m["metric"], m["group"])
                largest[slot] = max(largest.get(slot, 0), int(m["k"]))
    out: dict[str, list[str]] = {"best": [], "maj": []}
    for (metric, group), k in sorted(largest.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        out[metric].append(f"val/{group + '/' if group else ''}{metric}@{k}")
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _short(key: str) -> str:
    return key.removeprefix("val/").replace("domain/", "")


def plot_runs(runs: Sequence[tuple[str, Sequence[Mapping]]], out: str | Path, title: str | None = None) -> Path:
    """One PNG of ``(label, metrics lines)`` runs overlaid: validation accuracy over steps and over
    wall-clock, best@k and maj@k (overall and per domain), training reward, loss and throughput."""
    plt = _pyplot()
    at_k = {"best": [], "maj": []}
    for _, lines in runs:
        for metric, keys in at_k_keys(lines).items():
            at_k[metric] += [k for k in keys if k not in at_k[metric]]
    panels = [
        ("val/accuracy", "step", "validation accuracy"),
        ("val/accuracy", "wall", "validation accuracy over wall-clock"),
        ("best", "step", "best@k (validation)"),
        ("maj", "step", "maj@k (validation)"),
        ("rollout/reward_mean", "step", "training reward"),
        ("loss", "step", "loss"),
        ("rollout/tokens_per_s", "step", "rollout throughput (tokens/s)"),
        ("learner/tokens_per_s", "step", "learner throughput (tokens/s)"),
    ]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (key, x_axis, name) in zip(axes.flat, panels):
        drawn = False
        for i, (label, lines) in enumerate(runs):
            keys = at_k[key] if key in at_k else [key]
            for j, k in enumerate(keys):
                steps, wall, values = series(lines, k)
                if not values:
                    continue
                x = steps if x_axis == "step" else wall
                tag = label if len(keys) == 1 else f"{label}: {_short(k)}"
                ax.plot(x, values, styles[j % len(styles)], color=colors[i % len(colors)],
                        marker="o" if len(values) < 30 else None, markersize=3, label=tag)
                drawn = True
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step" if x_axis == "step" else "wall-clock (s)")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def plot_bands(curves: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]], out: str | Path, *,
               xlabel: str, ylabel: str = "validation success", title: str | None = None,
               ax=None) -> Path | None:
    """Mean ± std over seeds per label: ``curves[label]`` is one ``(x, y)`` per seed, all with the
    same x (steps), or any x (wall-clock: each seed is then drawn thin, the mean at the union of
    the x's by carrying each seed's last value forward)."""
    plt = _pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        xs = sorted({x for run_x, _ in runs for x in run_x})
        mean, std = [], []
        for x in xs:
            at = [step_value(run_x, run_y, x) for run_x, run_y in runs]
            at = [v for v in at if v is not None]
            m = sum(at) / len(at)
            mean.append(m)
            std.append(math.sqrt(sum((v - m) ** 2 for v in at) / (len(at) - 1)) if len(at) > 1 else 0.0)
        ax.plot(xs, mean, "-", color=color, marker="o" if len(xs) < 30 else None, markersize=3,
                label=f"{label} (n={len(runs)})")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.18, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    if not own:
        return None
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Lay ``fig`` out, write it as a PNG at ``out`` (its folder made if need be) and close it."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def step_value(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """The value of a step function at ``x``: the last ``y`` logged at or before it (None before
    the first)."""
    out = None
    for xi, yi in zip(xs, ys):
        if xi <= x + 1e-9:
            out = yi
        else:
            break
    return out
