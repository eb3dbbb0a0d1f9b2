import time

import pytest
import ray

from distil_ray.config import ReplayConfig
from distil_ray.replay import ReplayBuffer, ReplayQueue


def test_fifo_and_accounting():
    buf = ReplayBuffer(ReplayConfig(capacity=100, max_staleness=0))
    buf.put(["a"], 4, version=0, num_tokens=120)
    buf.put(["b"], 4, version=0)
    refs, versions, tokens = buf.take(1)
    assert refs == ["a"] and versions == [0] and tokens == [120]  # what balances the learner ranks
    s = buf.stats()
    assert (s["replay/accepted"], s["replay/served"], s["replay/queued"]) == (8, 4, 4)


def test_staleness_drops_old_groups_and_counts_them():
    buf = ReplayBuffer(ReplayConfig(capacity=100, max_staleness=1))
    buf.put(["v0"], 4, version=0)
    buf.put(["v1"], 3, version=1)
    buf.put(["v2"], 2, version=2)
    assert buf.drop_stale(current_version=2) == 4  # version 0 is two versions behind
    refs, versions, _ = buf.take(5)
    assert refs == ["v1", "v2"] and versions == [1, 2]
    s = buf.stats()
    assert s["replay/accepted"] == s["replay/served"] + s["replay/dropped"] + s["replay/queued"] == 9
    assert s["replay/dropped"] == 4


def test_on_policy_drops_everything_older_than_current():
    buf = ReplayBuffer(ReplayConfig(capacity=10, max_staleness=0))
    buf.put(["old"], 1, version=3)
    buf.drop_stale(current_version=4)
    assert buf.take(1) == ([], [], [])


def test_capacity_and_bad_values():
    buf = ReplayBuffer(ReplayConfig(capacity=5))
    assert buf.has_room(5)
    buf.put(["a"], 4, 0)
    assert not buf.has_room(2)
    with pytest.raises(ValueError, match="replay.capacity"):
        ReplayBuffer(ReplayConfig(capacity=0))
    with pytest.raises(ValueError, match="replay.max_staleness"):
        ReplayBuffer(ReplayConfig(capacity=1, max_staleness=-1))


@pytest.mark.timeout(120)
def test_actor_back_pressure_and_refs_are_not_resolved(ray_cluster):
    queue = ray.remote(num_cpus=0.1)(ReplayQueue).remote(ReplayConfig(capacity=4, max_staleness=0))
    records = [ray.put({"group": i}) for i in range(3)]
    assert ray.get(queue.put.remote([records[0]], 4, 0))
    # full: the second put waits until the learner takes something
    blocked = queue.put.remote([records[1]], 4, 0)
    ready, _ = ray.wait([blocked], timeout=1.0)
    assert not ready
    refs, versions, _ = ray.get(queue.get.remote(1, 0))
    assert versions == [0] and isinstance(refs[0], ray.ObjectRef) and ray.get(refs[0]) == {"group": 0}
    assert ray.get(blocked, timeout=30)
    # a timed-out put reports False and loses nothing that was already queued
    assert ray.get(queue.put.remote([records[2]], 4, 0, 0.2)) is False
    stats = ray.get(queue.stats.remote())
    assert stats["replay/accepted"] == 8 and stats["replay/served"] == 4 and stats["replay/queued"] == 4


@pytest.mark.timeout(120)
def test_actor_get_waits_for_producer(ray_cluster):
    queue = ray.remote(num_cpus=0.1)(ReplayQueue).remote(ReplayConfig(capacity=16))
    pending = queue.get.remote(2, 0)
    time.sleep(0.3)
    ray.get(queue.put.remote([ray.put("a")], 1, 0))
    ray.get(queue.put.remote([ray.put("b")], 1, 0))
    refs, _, _ = ray.get(pending, timeout=30)
    assert [ray.get(r) for r in refs] == ["a", "b"]
    # a get that times out returns what there is, without losing it
    refs, versions, _ = ray.get(queue.get.remote(1, 0, 0.2))
    assert refs == [] and versions == []
