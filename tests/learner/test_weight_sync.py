"""WeightSync decides who gets which weights: rollout workers always the policy; the teacher the
policy (current), the learners' moving average of it (ema: advanced at every push, not at a
resume) or nothing (fixed). Checked with recording actors on a real cluster."""

import pytest
import ray

from distil_ray.learner.weight_sync import WeightSync


@ray.remote(num_cpus=0)
class Recorder:
    """Stands in for an engine actor: records every weight call it receives."""

    def __init__(self):
        self.calls = []

    def update_weights(self, state, version):
        self.calls.append(("update", state["w"], version))

    def log(self):
        return self.calls


class FakeLearner:
    """What WeightSync asks of the learner group: refs to its weights (the policy, or the moving
    average), and to advance the average."""

    def __init__(self):
        self.pushed = 0
        self.ema_steps = 0

    def weights_ref(self, dtype, source="policy"):
        assert dtype == "float32"
        if source == "ema":
            return ray.put({"w": f"ema{self.ema_steps}"})
        self.pushed += 1
        return ray.put({"w": self.pushed})

    def advance_ema(self):
        self.ema_steps += 1


@pytest.mark.parametrize("update", ["current", "ema", "fixed"])
def test_push_and_restore_route_by_teacher_update(ray_cluster, tmp_path, update):
    rollouts, teacher = [Recorder.remote(), Recorder.remote()], Recorder.remote()
    learner = FakeLearner()
    sync = WeightSync(learner, rollouts, teacher, teacher_update=update)
    sync.connect()
    assert sync.push(1) >= 0
    sync.restore(5, tmp_path)
    sync.close()
    for r in rollouts:  # the policy, at every push and at the resume
        assert ray.get(r.log.remote()) == [("update", 1, 1), ("update", 2, 5)]
    expected = {
        "current": [("update", 1, 1), ("update", 2, 5)],
        # the average, moved once by the push; a resume sends the restored average unmoved
        "ema": [("update", "ema1", 1), ("update", "ema1", 5)],
        "fixed": [],  # the initial policy, whatever happens
    }[update]
    assert ray.get(teacher.log.remote()) == expected
    assert learner.ema_steps == (1 if update == "ema" else 0)


def test_without_a_teacher_only_the_rollouts_follow(ray_cluster, tmp_path):
    rollout = Recorder.remote()
    learner = FakeLearner()
    sync = WeightSync(learner, [rollout], None, teacher_update="ema")
    sync.push(3)
    sync.restore(4, tmp_path)
    assert ray.get(rollout.log.remote()) == [("update", 1, 3), ("update", 2, 4)]
    assert learner.ema_steps == 0  # no EMA teacher: no average to keep
