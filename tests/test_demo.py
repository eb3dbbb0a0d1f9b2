"""`make demo` keeps working: two steps of the one-process DistIL loop on the tiny model."""

import math

from distil_ray import demo


def test_demo_runs_and_reports_finite_losses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTIL_RAY_CACHE", str(tmp_path))
    demo.main(["--steps", "2", "--prompts", "2", "--samples", "2", "--max-new-tokens", "6"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r[2])) for r in rows)
