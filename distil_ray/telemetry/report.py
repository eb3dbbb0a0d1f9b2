"""Summarise a finished run from its ``metrics.jsonl``: where the wall time went, stage by stage,
and the validation curve.

    python -m distil_ray.telemetry.report outputs/2026-11-27/02-20-16 [more run dirs...]
    python -m distil_ray.telemetry.report multirun/2026-11-27/02-20-16     # a sweep: every job in it
    python -m distil_ray.telemetry.report RUN_DIR [RUN_DIR...] --plot runs.png   # and a figure of them

Each run is labelled by its command-line overrides (Hydra's ``.hydra/overrides.yaml``), the ones
shared by every run shown left out, so a sweep's jobs read as what differs between them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distil_ray.telemetry.metrics import METRICS_FILE, read_metrics

STAGES = ("rollout", "feedback", "teacher", "group", "queue", "learner", "sync", "overhead")


def stage_seconds(lines: list[dict]) -> dict[str, float]:
    """Total seconds per stage over all training steps, plus start-up, evaluation and checkpoints."""
    out = {"startup": sum(line.get("time/startup_s", 0.0) for line in lines)}
    for line in lines:
        for key, value in line.items():
            if key.startswith("time/startup/"):
                out["  " + key[len("time/startup/"):-2]] = out.get("  " + key[len("time/startup/"):-2], 0.0) + value
    train = [line for line in lines if "time/step_s" in line]
    for stage in STAGES:
        out[stage] = sum(line.get(f"time/{stage}_s", 0.0) for line in train)
    out["evaluation"] = sum(line.get("time/eval_s", 0.0) for line in lines)
    out["checkpoint"] = sum(line.get("time/checkpoint_s", 0.0) for line in lines)
    return out


def val_curve(lines: list[dict], key: str = "val/accuracy") -> list[tuple[int, float]]:
    return [(int(line["step"]), float(line[key])) for line in lines if key in line]


def find_runs(path: Path) -> list[Path]:
    """``path`` itself if it is a run directory, else every run directory below it (a multirun
    sweep's jobs), in order."""
    path = Path(path)
    if (path / METRICS_FILE).is_file():
        return [path]
    runs = sorted({p.parent for p in path.rglob(METRICS_FILE)}, key=lambda p: (len(p.parts), _natural(p)))
    if not runs:
        raise FileNotFoundError(f"{path}: no run directory (no {METRICS_FILE}) here or below")
    return runs


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in path.parts]


def overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides, as Hydra recorded them ([] when it did not)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def labels(run_dirs: list[Path]) -> list[str]:
    """Each run's overrides that not every run shares (its path when nothing tells them apart)."""
    per_run = [overrides(r) for r in run_dirs]
    shared = set.intersection(*map(set, per_run)) if per_run else set()
    out = []
    for run_dir, own in zip(run_dirs, per_run):
        distinct = [o for o in own if o not in shared]
        out.append(" ".join(distinct) if distinct and len(run_dirs) > 1 else " ".join(own) or str(run_dir))
    return out


def report(run_dir: Path, label: str | None = None) -> str:
    lines = read_metrics(run_dir)
    seconds = stage_seconds(lines)
    summary_path = Path(run_dir) / "summary.json"
    wall = json.loads(summary_path.read_text())["wall_s"] if summary_path.exists() else None
    train = [line for line in lines if "time/step_s" in line]
    rows = [f"run {run_dir}" + (f"  [{label}]" if label and label != str(run_dir) else "")]
    if wall is not None:
        rows.append(f"  wall (driver, Ray start to shutdown) {wall:8.1f} s")
    for stage, s in seconds.items():
        rows.append(f"  {stage:<12} {s:8.2f} s" + (f"   {s / len(train):.3f} s/step" if stage in STAGES and train else ""))
    syncs = [line["time/sync_s"] for line in train if "time/sync_s" in line]
    if syncs:  # (a step whose update was skipped has no sync)
        rows.append(f"  sync per step: mean {sum(syncs) / len(syncs):.3f} s, max {max(syncs):.3f} s")
    curve = val_curve(lines)
    if curve:
        rows.append("  val/accuracy: " + "  ".join(f"{step}:{acc:.3f}" for step, acc in curve))
        rows.append(f"  gain over step 0: {curve[-1][1] - curve[0][1]:+.3f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path, metavar="OUT.png",
                        help="also draw the runs, overlaid and labelled by their overrides, into this PNG")
    args = parser.parse_args(argv)
    try:
        runs = [run for path in args.run_dirs for run in find_runs(path)]
    except FileNotFoundError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    names = labels(runs)
    for run_dir, label in zip(runs, names):
        print(report(run_dir, label))
    if args.plot is not None:
        from distil_ray.telemetry.plots import plot_runs

        out = plot_runs([(label, read_metrics(r)) for r, label in zip(runs, names)], args.plot)
        print(f"figure: {out}")


if __name__ == "__main__":
    main()
