"""Figures of runs: the wall-clock time line, the best@k / maj@k keys found per domain, step
functions for equal wall-clock, and `report --plot` writing a PNG of a sweep's jobs."""

import json
import subprocess
import sys

import pytest
import yaml

from distil_ray.telemetry.plots import at_k_keys, plot_bands, series, step_value, wall_clock


def _lines():
    return [
        {"step": 0, "time/startup_s": 10.0},
        {"step": 0, "val/accuracy": 0.1, "val/best@4": 0.3, "val/maj@2": 0.1, "val/maj@4": 0.2,
         "val/domain/chemistry/best@4": 0.5, "val/domain/physics/best@4": 0.25, "time/eval_s": 2.0},
        {"step": 1, "loss": 1.0, "time/step_s": 1.5},
        {"step": 2, "loss": 0.5, "time/step_s": 0.5, "time/checkpoint_s": 1.0},
        {"step": 2, "val/accuracy": 0.6, "val/best@4": 0.8, "val/maj@4": 0.7, "time/eval_s": 2.0},
    ]


def test_wall_clock_sums_the_logged_durations_in_order():
    assert wall_clock(_lines()) == [10.0, 12.0, 13.5, 15.0, 17.0]
    steps, wall, values = series(_lines(), "val/accuracy")
    assert steps == [0, 2] and wall == [12.0, 17.0] and values == [0.1, 0.6]


def test_largest_k_of_best_and_maj_overall_and_per_domain():
    keys = at_k_keys(_lines())
    assert keys["best"] == ["val/best@4", "val/domain/chemistry/best@4", "val/domain/physics/best@4"]
    assert keys["maj"] == ["val/maj@4"]


def test_step_value_carries_the_last_value_forward():
    assert step_value([0, 10, 20], [0.1, 0.5, 0.9], -1) is None
    assert step_value([0, 10, 20], [0.1, 0.5, 0.9], 0) == 0.1
    assert step_value([0, 10, 20], [0.1, 0.5, 0.9], 15) == 0.5
    assert step_value([0, 10, 20], [0.1, 0.5, 0.9], 99) == 0.9


def test_bands_of_seeds_are_written(tmp_path):
    out = plot_bands({"distil": [([0, 10], [0.1, 0.9]), ([0, 10], [0.1, 0.7])], "ce": [([0, 10], [0.1, 0.5])]},
                     tmp_path / "bands.png", xlabel="step")
    assert out.stat().st_size > 5000


def _job(root, name, overrides, lines):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_report_plots_a_sweep_root_into_one_png(tmp_path):
    for i, algo in enumerate(["distil", "ce"]):
        _job(tmp_path / "sweep", str(i), ["+experiment=claims", f"algorithm={algo}"], _lines())
    out = tmp_path / "figs" / "runs.png"
    proc = subprocess.run([sys.executable, "-m", "distil_ray.telemetry.report", str(tmp_path / "sweep"),
                           "--plot", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"figure: {out}" in proc.stdout and out.stat().st_size > 20000
    from PIL import Image

    assert Image.open(out).size[0] > 1000  # eight panels side by side in two rows


def test_report_of_a_directory_without_runs_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distil_ray.telemetry.report", str(tmp_path), "--plot",
                           str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no run directory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("missing", ["val/best@4", "loss"])
def test_panels_of_metrics_a_run_did_not_log_say_so(tmp_path, missing):
    from distil_ray.telemetry.plots import plot_runs

    lines = [{k: v for k, v in line.items() if not k.startswith(missing.split("@")[0])} for line in _lines()]
    assert plot_runs([("run", lines)], tmp_path / "p.png").is_file()
