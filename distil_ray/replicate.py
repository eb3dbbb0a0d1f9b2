"""Replicate an experiment's comparison: every algorithm × seeds, a top-k ablation, a results table
and figures.

    python -m distil_ray.replicate claims                       # 6 algorithms x 3 seeds + top-k ablation
    python -m distil_ray.replicate claims --seeds 0 1 2 3 4 --algorithms distil ce grpo
    python -m distil_ray.replicate claims --topk                # no top-k ablation
    python -m distil_ray.replicate claims -- trainer.total_steps=100   # overrides for every run

Each run is ``python -m distil_ray.main +experiment=<name> algorithm=<a> seed=<s> [teacher.topk=<k>]``
in its own process (its own Ray cluster), one after the other, into ``OUT/runs/<a>[-k<k>]-s<s>``.
A run that finished with the same overrides (its ``summary.json`` and ``.hydra/overrides.yaml``)
is not run again, so an interrupted replication continues where it stopped; an unfinished one, or
one run with other overrides, starts afresh in an emptied directory. Then ``OUT/results.md`` (and ``results.json``) gets validation success,
mean ± std over seeds, at every evaluated step and at equal wall-clock budgets, and ``OUT/*.png``
the figures: DistIL vs CE, every algorithm overlaid, the top-k ablation.

Wall-clock here is training time: each run's steps, evaluations and checkpoints as it logged them,
start-up (Ray, actors, and the one-off warm start of the first run) left out, so every run is
compared on the time its algorithm takes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distil_ray.telemetry.metrics import read_metrics
from distil_ray.telemetry.plots import plot_bands, save_figure, step_value
from distil_ray.telemetry.report import overrides as recorded_overrides

ALGORITHMS = ("distil", "ce", "sdpo", "opsd", "grpo", "sft")
DEFAULT_TOPK = (1, 5, 20, "all")
KEY = "val/accuracy"
ALL_VOCAB = 1_000_000  # teacher.topk beyond the vocabulary: the learner-side teacher keeps all of it


@dataclass(frozen=True)
class RunSpec:
    algorithm: str
    seed: int
    topk: int | str | None = None  # None: the experiment's own teacher.topk

    @property
    def name(self) -> str:
        return f"{self.algorithm}{'' if self.topk is None else f'-k{self.topk}'}-s{self.seed}"

    def overrides(self, experiment: str, vocab_size: int | None = None) -> list[str]:
        out = [f"+experiment={experiment}", f"algorithm={self.algorithm}", f"seed={self.seed}"]
        if self.topk is not None:
            out.append(f"teacher.topk={vocab_size if self.topk == 'all' else self.topk}")
        return out


def _topk(value: str) -> int | str:
    if value == "all":
        return value
    k = int(value)
    if k < 1:
        raise argparse.ArgumentTypeError(f"--topk {value}: a top-k is >= 1 or 'all'")
    return k


def plan(algorithms, seeds, topks, topk_seeds, default_topk: int) -> list[RunSpec]:
    """The runs: every algorithm × seed, then DistIL at each ablated top-k (the experiment's own
    top-k is the main DistIL run, not run twice)."""
    runs = [RunSpec(a, s) for a in algorithms for s in seeds]
    for k in topks:
        for s in topk_seeds:
            if k == default_topk and "distil" in algorithms and s in seeds:
                continue
            runs.append(RunSpec("distil", s, k))
    return list(dict.fromkeys(runs))  # a value given twice is one run


def composed(experiment: str, overrides: list[str]) -> dict:
    """The experiment's composed config (the values a run would get), without running it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from distil_ray.config import register_configs

    register_configs()
    conf_dir = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        cfg = compose("config", overrides=[f"+experiment={experiment}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def run_one(spec: RunSpec, out: Path, experiment: str, extra: list[str], vocab_size: int,
            timeout_s: float = 1800.0) -> tuple[bool, float]:
    """Run one job to completion, or until ``timeout_s`` (its log next to its run dir);
    ``(finished, seconds)``."""
    run_dir = out / "runs" / spec.name
    wanted = [*spec.overrides(experiment, vocab_size), *extra]
    if (run_dir / "summary.json").is_file() and recorded_overrides(run_dir) == wanted:
        return True, 0.0
    if run_dir.exists():  # unfinished, or other overrides: its metrics must not mix with the new run's
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "distil_ray.main", *wanted, f"hydra.run.dir={run_dir}"]
    log = out / "runs" / f"{spec.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:  # the run is killed; its directory is emptied on the next try
            f.write(f"\nreplicate: stopped after {timeout_s:g} s (--run-timeout-s)\n")
            rc = None
    return rc == 0 and (run_dir / "summary.json").is_file(), time.perf_counter() - t0


# ---------------------------------------------------------------------------------- results


def training_curve(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """``(steps, training wall-clock s, val/accuracy)`` at each evaluation of a run."""
    steps, wall, values, t = [], [], [], 0.0
    for line in read_metrics(run_dir):
        if KEY in line:  # the time at which this evaluation started (step 0: at 0 s)
            steps.append(int(line["step"]))
            wall.append(t)
            values.append(float(line[KEY]))
        t += sum(float(line.get(k, 0.0)) for k in ("time/step_s", "time/eval_s", "time/checkpoint_s"))
    return steps, wall, values


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def _fmt(values: list[float], n: int | None = None) -> str:
    """mean ± std (sample std; "n=1" when there is one value), and how many seeds when fewer than ``n``."""
    if not values:
        return "–"
    m, s = mean_std(values)
    text = f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f} (n=1)"
    return text + (f" (n={len(values)})" if n is not None and 1 < len(values) < n else "")


def summarise(out: Path, specs: list[RunSpec], default_topk: int) -> dict:
    """Tables (markdown) and figures from the finished runs in ``out``."""
    curves: dict[str, list] = {}
    left_out = []
    for spec in specs:
        run_dir = out / "runs" / spec.name
        curve = training_curve(run_dir) if (run_dir / "summary.json").is_file() else None
        if not curve or not curve[0]:  # unfinished, failed, or never evaluated
            left_out.append(spec.name)
            continue
        label = spec.algorithm if spec.topk is None else f"distil k={spec.topk}"
        curves.setdefault(label, []).append(curve)
    main = {a: c for a, c in curves.items() if not a.startswith("distil k=")}
    steps = sorted({s for runs in main.values() for run in runs for s in run[0]})
    finals = {a: [run[2][-1] for run in runs] for a, runs in main.items()}
    # equal wall-clock: fractions of the shortest algorithm's (mean) training time
    ends = {a: mean_std([run[1][-1] for run in runs])[0] for a, runs in main.items()}
    shortest = min(ends.values()) if ends else 0.0
    budgets = [shortest * f for f in (0.25, 0.5, 0.75, 1.0)]

    def at_step(runs, step):
        return [run[2][run[0].index(step)] for run in runs if step in run[0]]

    def at_wall(runs, budget):
        return [v for v in (step_value(run[1], run[2], budget) for run in runs) if v is not None]

    lines = [f"# Replication: validation success (`{KEY}`), mean ± std over seeds", ""]
    lines += ["## At fixed step budgets", "", "| algorithm | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|---|" + "---|" * len(steps)]
    for a, runs in main.items():
        lines.append(f"| {a} (n={len(runs)}) | " + " | ".join(_fmt(at_step(runs, s), len(runs)) for s in steps) + " |")
    lines += ["", f"## At equal training wall-clock (seconds; {shortest:.1f} s = the fastest algorithm's "
              "whole run)", "", "| algorithm | mean s per run | " + " | ".join(f"{b:.1f} s" for b in budgets) + " |",
              "|---|---|" + "---|" * len(budgets)]
    for a, runs in main.items():
        lines.append(f"| {a} | {ends[a]:.1f} | " + " | ".join(_fmt(at_wall(runs, b), len(runs)) for b in budgets) + " |")
    ablation = {a: c for a, c in curves.items() if a.startswith("distil k=")}
    if ablation:
        if "distil" in main and f"distil k={default_topk}" not in ablation:
            ablation = {f"distil k={default_topk}": main["distil"], **ablation}
        ablation = dict(sorted(ablation.items(), key=lambda kv: _k_order(kv[0])))
        lines += ["", "## Top-k ablation (DistIL; final validation success)", "",
                  "| teacher top-k | n | final |", "|---|---|---|"]
        for a, runs in ablation.items():
            lines.append(f"| {a.removeprefix('distil k=')} | {len(runs)} | {_fmt([r[2][-1] for r in runs])} |")
    checks = {}
    if "distil" in finals and "ce" in finals:
        gap = mean_std(finals["distil"])[0] - mean_std(finals["ce"])[0]
        checks["distil_minus_ce"] = gap
        lines += ["", f"DistIL − CE, final validation success: **{gap:+.3f}** "
                  f"({'≥' if gap >= 0.2 else '<'} 0.2)"]
    if "distil" in main and "grpo" in main:
        holds = all(mean_std(at_step(main["distil"], s))[0] >= mean_std(at_step(main["grpo"], s))[0]
                    for s in steps if at_step(main["distil"], s) and at_step(main["grpo"], s))
        holds_wall = all(mean_std(at_wall(main["distil"], b))[0] >= mean_std(at_wall(main["grpo"], b))[0]
                         for b in budgets if at_wall(main["distil"], b) and at_wall(main["grpo"], b))
        checks["distil_ge_grpo_every_step"] = holds
        checks["distil_ge_grpo_every_wall_budget"] = holds_wall
        lines.append(f"DistIL ≥ GRPO at every step budget: **{'yes' if holds else 'no'}**; "
                     f"at every wall-clock budget: **{'yes' if holds_wall else 'no'}**")
    if left_out:
        lines += ["", f"Left out (unfinished, failed or never evaluated): {', '.join(left_out)}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    result = {"steps": steps, "wall_budgets_s": budgets, "checks": checks, "left_out": left_out,
              "final": {a: finals[a] for a in finals},
              "curves": {a: [{"steps": r[0], "wall_s": r[1], KEY: r[2]} for r in runs] for a, runs in curves.items()}}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _figures(out, main, ablation)
    return result


def _k_order(label: str):
    k = label.removeprefix("distil k=")
    return math.inf if k == "all" else int(k)


def _figures(out: Path, main: dict, ablation: dict) -> None:
    from distil_ray.telemetry.plots import _pyplot

    plt = _pyplot()

    def two_panels(groups: dict, name: str, title: str) -> None:
        if not groups:
            return
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        plot_bands({a: [(r[0], r[2]) for r in runs] for a, runs in groups.items()}, None, xlabel="step",
                   title=f"{title}: over steps", ax=axes[0])
        plot_bands({a: [(r[1], r[2]) for r in runs] for a, runs in groups.items()}, None,
                   xlabel="training wall-clock (s)", title=f"{title}: over wall-clock", ax=axes[1])
        save_figure(fig, out / name)

    two_panels({a: main[a] for a in ("distil", "ce") if a in main}, "distil_vs_ce.png",
               "future credit (DistIL) vs local credit (CE)")
    two_panels(main, "all_algorithms.png", "every algorithm")
    two_panels(ablation, "topk_ablation.png", "DistIL, teacher top-k")


# ---------------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="an experiment of conf/experiment (e.g. claims)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--topk", type=_topk, nargs="*", default=list(DEFAULT_TOPK),
                        help="teacher top-k values for the DistIL ablation ('all': the whole vocabulary); "
                             "none: no ablation")
    parser.add_argument("--topk-seeds", type=int, nargs="+", default=None,
                        help="seeds of the ablation runs (default: the first of --seeds, which keeps the "
                             "whole replication within 20 minutes on two cores)")
    parser.add_argument("--out", type=Path, default=None, help="default: replications/<experiment>")
    parser.add_argument("--summarise-only", action="store_true", help="tables and figures of the runs already done")
    parser.add_argument("--run-timeout-s", type=float, default=1800.0,
                        help="a run still going after this long is stopped and counted as failed")
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after "--" is Hydra overrides for every run (split here: argparse would give a
    # trailing positional list nothing once the experiment name has been read)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = overrides
    out = args.out or Path("replications") / args.experiment
    try:
        cfg = composed(args.experiment, args.overrides)
    except Exception as e:  # an unknown experiment or a bad override: say so before any run starts
        print(f"replicate: cannot compose +experiment={args.experiment}: {e}", file=sys.stderr)
        return 2
    default_topk = int(cfg["teacher"]["topk"])
    if "all" in args.topk and cfg["teacher"]["backend"] != "learner":
        print(f"replicate: --topk all needs teacher.backend=learner (the experiment's is "
              f"{cfg['teacher']['backend']!r}: an engine returns a bounded number of log-probs)", file=sys.stderr)
        return 2
    vocab = int(cfg["model"]["tiny"]["vocab_size"]) if cfg["model"]["path"] is None else ALL_VOCAB
    specs = plan(args.algorithms, args.seeds, args.topk, args.topk_seeds or args.seeds[:1], default_topk)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.summarise_only:
        t_start = time.perf_counter()
        for i, spec in enumerate(specs, 1):
            ok, seconds = run_one(spec, out, args.experiment, args.overrides, vocab, args.run_timeout_s)
            status = "done" if seconds == 0.0 and ok else ("ok" if ok else "FAILED")
            print(f"[{i}/{len(specs)}] {spec.name:<16} {status:<6} {seconds:6.1f} s   "
                  f"(elapsed {time.perf_counter() - t_start:6.1f} s)", flush=True)
            if not ok:
                failed.append(spec.name)
        print(f"all runs: {time.perf_counter() - t_start:.1f} s")
    summarise(out, specs, default_topk)
    print((out / "results.md").read_text())
    print(f"tables: {out / 'results.md'}; figures: {', '.join(str(p) for p in sorted(out.glob('*.png')))}")
    if failed:
        print(f"replicate: {len(failed)} run(s) failed: {', '.join(failed)} (see {out / 'runs'}/<name>.log)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
