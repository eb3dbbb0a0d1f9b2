"""Placement on a two-node cluster (``ray.cluster_utils.Cluster``: two raylets on this machine):
custom resources put each kind of actor on the node that offers them, the learner ranks share one
node (one placement group, STRICT_PACK), and the tiny run goes through across both nodes."""

import os

import pytest
import ray
from ray.cluster_utils import Cluster

from distil_ray.config import compose_config
from distil_ray.trainer import Trainer

from tests.test_faults import FAST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)


def test_actors_land_where_the_config_says_and_the_run_spans_both_nodes(tmp_path):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"engines": 8}})
    learner_node = cluster.add_node(num_cpus=2, resources={"learners": 8})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        head_id = ray.get_runtime_context().get_node_id()  # the driver runs on the head
        cfg = compose_config(FAST + ["trainer.total_steps=2", "trainer.eval_every=0", "ray.num_cpus=null",
                                     "+rollout.resources.engines=1", "+teacher.resources.engines=1",
                                     "+feedback.resources.engines=1", "+learner.resources.learners=1"])
        trainer = Trainer(cfg, tmp_path)
        trainer.setup()
        try:
            engines = trainer.rollout_workers + [trainer.teacher] + trainer.feedback.workers
            assert {_node_of(a) for a in engines} == {head_id}
            assert {_node_of(a) for a in trainer.learner.actors} == {learner_node.node_id}
            assert trainer.learner.placement.bundle_specs == [{"CPU": 0.5, "learners": 1.0}] * 2
            for _ in range(2):
                metrics, _ = trainer.train_step()
            assert metrics["replay/served"] == 2 * 2 * 2
        finally:
            summary = trainer.finish()
        assert summary["step"] == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
