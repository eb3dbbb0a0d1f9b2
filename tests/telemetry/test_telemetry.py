"""JSONL metrics round-trip (numpy / torch scalars, non-finite values, crash safety) and the
content of the per-step console line."""

import importlib.util
import json
import logging
import math

import numpy as np
import pytest
import torch

from distil_ray.config import RunConfig
from distil_ray.telemetry import (
    METRICS_FILE,
    MetricsLogger,
    Progress,
    format_eta,
    format_table,
    read_metrics,
)
from distil_ray.telemetry.metrics import plain_config, to_float


class FakeClock:
    """A settable time source, so step times and the ETA are exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# --------------------------------------------------------------------------- metrics.jsonl


def test_metrics_round_trip(tmp_path):
    with MetricsLogger(tmp_path, config=RunConfig()) as log:
        written = log.log(1, {"loss": torch.tensor(0.25), "reward": np.float32(0.5), "n": np.int64(7),
                              "ok": True, "plain": 3})
        log.log(2, {"loss": 0.125})
    assert written == {"loss": 0.25, "reward": 0.5, "n": 7.0, "ok": 1.0, "plain": 3.0}
    assert all(type(v) is float for v in written.values())
    records = read_metrics(tmp_path / METRICS_FILE)
    assert records == [
        {"step": 1, "loss": 0.25, "reward": 0.5, "n": 7.0, "ok": 1.0, "plain": 3.0},
        {"step": 2, "loss": 0.125},
    ]
    assert read_metrics(tmp_path) == records  # the run directory works as well


def test_non_finite_values_are_strict_json_and_read_back(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(3, {"a": float("nan"), "b": np.float64("inf"), "c": torch.tensor(-math.inf)})
    log.close()
    line = (tmp_path / METRICS_FILE).read_text().strip()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    (record,) = read_metrics(tmp_path / METRICS_FILE)
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf


def test_each_line_is_flushed_before_close(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(1, {"x": 1.0})
    # another reader sees the line while the logger is still open (a killed run keeps it)
    assert read_metrics(tmp_path / METRICS_FILE) == [{"step": 1, "x": 1.0}]
    log.close()


def test_non_numeric_values_are_skipped_with_one_warning(tmp_path, caplog):
    log = MetricsLogger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="distil_ray.telemetry.metrics"):
        log.log(1, {"name": "abc", "vec": np.zeros(3), "x": 1.0})
        log.log(2, {"name": "abc", "x": 2.0})
    log.close()
    assert read_metrics(tmp_path / METRICS_FILE) == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}]
    assert sum("'name'" in r.getMessage() for r in caplog.records) == 1


def test_append_and_truncated_last_line(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"x": 1.0})
    with MetricsLogger(tmp_path) as log:  # a resumed run appends
        log.log(2, {"x": 2.0})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 3, "x"')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2]


def test_wandb_without_the_package_warns_once_and_still_writes(tmp_path, caplog):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; this checks the fallback")
    with caplog.at_level(logging.WARNING, logger="distil_ray.telemetry.metrics"):
        log = MetricsLogger(tmp_path, wandb=True, project="p", mode="offline", config={"a": 1})
        log.log(1, {"x": 1.0})
        log.log(2, {"x": 2.0})
        log.close()
    assert sum("wandb" in r.getMessage() for r in caplog.records) == 1
    assert len(read_metrics(tmp_path / METRICS_FILE)) == 2


def test_to_float_and_plain_config():
    assert to_float(torch.tensor([2.5])) == 2.5
    assert to_float(torch.zeros(2)) is None and to_float("1.0") is None and to_float(None) is None
    cfg = plain_config(RunConfig())
    assert cfg["rollout"]["n_samples"] == 4 and isinstance(cfg["teacher"]["reprompt"], dict)


# --------------------------------------------------------------------------- console


def test_console_line_content():
    clock = FakeClock()
    progress = Progress(40, clock=clock)
    clock.now += 1.9
    line = progress.line(
        1, {"reward": np.float32(0.41), "loss": torch.tensor(0.5321), "tokens": 2280},
        {"rollout": 0.8, "feedback": 0.1, "teacher": 0.3, "learner": 0.9, "sync": 0.2},
    )
    assert line == (
        "step 1/40 | reward 0.41 | loss 0.532 | 1.2k tok/s | rollout 0.8s feedback 0.1s teacher 0.3s "
        "learner 0.9s sync 0.2s | 1.9 s/step | ETA 1:14"
    )


def test_eta_uses_the_mean_of_recent_steps():
    clock = FakeClock()
    progress = Progress(40, start_step=10, window=2, clock=clock)
    for dt in (10.0, 1.0, 3.0):  # the first step falls out of the window of 2
        clock.now += dt
        line = progress.line(progress.last_step + 1, {})
    assert progress.step_seconds() == pytest.approx(2.0)
    # 13 of 40 done: 27 left at 2 s
    assert line == "step 13/40 | 2.0 s/step | ETA 0:54"


def test_lines_several_steps_apart_share_the_time():
    clock = FakeClock()
    progress = Progress(100, clock=clock)
    clock.now += 10.0
    line = progress.line(5, {"train/reward": 1, "learner/loss": 0.5, "tok_per_s": 950.0})
    assert line == "step 5/100 | reward 1 | loss 0.5 | 950 tok/s | 2.0 s/step | ETA 3:10"


def test_stage_order_and_extra_stages():
    clock = FakeClock()
    progress = Progress(2, clock=clock)
    clock.now += 150
    line = progress.line(1, {}, {"sync": 0.04, "queue": 2.5, "rollout": 120.0})
    assert "| rollout 120s sync 0.04s queue 2.5s |" in line
    assert line.endswith("150.0 s/step | ETA 2:30")


def test_print_writes_one_line(capsys):
    clock = FakeClock()
    progress = Progress(3, clock=clock)
    clock.now += 1
    text = progress.print(1, {"loss": 1.0})
    assert capsys.readouterr().out == text + "\n"


def test_format_eta():
    assert format_eta(53) == "0:53" and format_eta(725) == "12:05" and format_eta(3723) == "1:02:03"


def test_format_table():
    table = format_table([
        {"algorithm": "distil", "val/accuracy": 0.71234, "steps": 40},
        {"algorithm": "grpo", "val/accuracy": np.float64(0.5), "steps": 40, "note": None},
    ])
    lines = table.splitlines()
    assert lines[0].split() == ["algorithm", "val/accuracy", "steps", "note"]
    assert lines[2].split() == ["distil", "0.7123", "40", "-"]
    assert lines[3].split() == ["grpo", "0.5", "40", "-"]
    # numbers right-aligned under their header
    assert lines[2].index("0.7123") + len("0.7123") == lines[3].index("0.5") + len("0.5")
