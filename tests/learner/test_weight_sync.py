"""WeightSync decides who gets which weights: rollout workers always the policy; the teacher the
policy (current), its moving average (ema: it averages the pushed policy in, and a resume loads
the saved average instead) or nothing (fixed). Checked with recording actors on a real cluster."""

import pytest
import ray

from distil_ray.learner.weight_sync import TEACHER_EMA, WeightSync


@ray.remote(num_cpus=0)
class Recorder:
    """Stands in for an engine actor: records every weight call it receives."""

    def __init__(self):
        self.calls = []

    def update_weights(self, state, version):
        self.calls.append(("update", state["w"], version))

    def load_ema(self, path, version):
        self.calls.append(("load_ema", path, version))

    def save_ema(self, path):
        self.calls.append(("save_ema", path))

    def log(self):
        return self.calls


class FakeLearner:
    """The one thing WeightSync asks of the learner group: a ref to its state dict."""

    def __init__(self):
        self.pushed = 0

    def weights_ref(self, dtype):
        assert dtype == "float32"
        self.pushed += 1
        return ray.put({"w": self.pushed})


@pytest.mark.parametrize("update", ["current", "ema", "fixed"])
def test_push_save_and_restore_route_by_teacher_update(ray_cluster, tmp_path, update):
    rollouts, teacher = [Recorder.remote(), Recorder.remote()], Recorder.remote()
    sync = WeightSync(FakeLearner(), rollouts, teacher, teacher_update=update)
    sync.connect()
    assert sync.push(1) >= 0
    sync.save(tmp_path)
    sync.restore(5, tmp_path)
    sync.close()
    for r in rollouts:  # the policy, at every push and at the resume
        assert ray.get(r.log.remote()) == [("update", 1, 1), ("update", 2, 5)]
    expected = {
        "current": [("update", 1, 1), ("update", 2, 5)],
        # averages the pushed policy in; its own average is saved and comes back on resume
        "ema": [("update", 1, 1), ("save_ema", str(tmp_path / TEACHER_EMA)), ("load_ema", str(tmp_path / TEACHER_EMA), 5)],
        "fixed": [],  # the initial policy, whatever happens
    }[update]
    assert ray.get(teacher.log.remote()) == expected


def test_without_a_teacher_only_the_rollouts_follow(ray_cluster, tmp_path):
    rollout = Recorder.remote()
    sync = WeightSync(FakeLearner(), [rollout], None, teacher_update="ema")
    sync.push(3)
    sync.save(tmp_path)
    sync.restore(4, tmp_path)
    assert ray.get(rollout.log.remote()) == [("update", 1, 3), ("update", 2, 4)]
