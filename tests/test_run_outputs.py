"""What a run leaves for its user: readable samples (validation generations with the teacher's
context, every training rollout) and a bounded number of checkpoints."""

import json

import pytest

from distil_ray.config import compose_config
from distil_ray.trainer import Trainer

from tests.test_faults import FAST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generations_rollouts_and_checkpoint_retention(ray_cluster, tmp_path):
    cfg = compose_config(FAST + ["trainer.total_steps=3", "trainer.eval_every=3", "trainer.checkpoint_every=1",
                                 "trainer.keep_checkpoints=2", "logging.log_generations=3", "logging.rollout_dump=true"])
    summary = Trainer(cfg, tmp_path).fit()
    assert summary["step"] == 3
    for step in (0, 3):  # the evaluation at the start and at step 3
        rows = _rows(tmp_path / "generations" / f"step_{step:06d}.jsonl")
        assert len(rows) == 3 and all(r["step"] == step for r in rows)
        assert all(r["prompt"].strip() and "<|im_start|>" in r["prompt"] for r in rows)  # as the model saw it
        # a failed sample's teacher context: its prompt, then its feedback
        for r in rows:
            if not r["correct"]:
                assert r["teacher_context"] is not None and r["feedback"]
                assert r["feedback"].split("\n")[0][:20] in r["teacher_context"]
    for step in (1, 2, 3):
        rows = _rows(tmp_path / "rollouts" / f"step_{step:06d}.jsonl")
        assert len(rows) == 2 * 2 and {r["policy_version"] for r in rows} == {step - 1}
        assert all(r["distilled"] == (r["teacher_context"] is not None) for r in rows)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_000002", "step_000003"]


def test_the_run_s_gauges_reach_the_clusters_metrics_endpoint(ray_cluster, tmp_path):
    """What Prometheus (and the dashboard's Metrics view) scrapes from the node: every gauge the
    docs list, labelled with the run."""
    import time
    import urllib.request

    import ray

    from distil_ray.telemetry.ray_metrics import GAUGES

    cfg = compose_config(FAST + ["trainer.total_steps=2", "trainer.eval_every=0", "replay.max_staleness=1"])
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    try:
        for _ in range(2):
            trainer.train_step()
        port = ray._private.worker.global_worker.node.metrics_export_port
        wanted = {f"ray_{name}" for key, (name, _) in GAUGES.items() if key != "val/accuracy"}  # no evaluation ran
        found: set[str] = set()
        deadline = time.monotonic() + 60
        while found != wanted and time.monotonic() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            found = {line.split("{")[0] for line in text.splitlines()
                     if line.startswith("ray_distil_ray_") and f'run="{tmp_path.name}"' in line} & wanted
            time.sleep(1)
        assert found == wanted, sorted(wanted - found)
    finally:
        trainer.shutdown()
