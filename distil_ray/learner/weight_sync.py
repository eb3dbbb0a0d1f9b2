"""WeightSync: which engines get which weights after a step, and how they get them.

The rollout workers always load the policy. The teacher follows ``teacher.update``: the policy
itself (``current``), a moving average of it that the teacher keeps and advances with every push
(``ema``), or nothing (``fixed``, the initial policy). The same rule serves the step's sync and a
resume, so the two can never disagree about who gets what; a resumed EMA teacher loads its saved
average instead of averaging the policy in once more.

Transport today: the object store. Rank 0's full HF-named weights are put once, in the engines'
dtype (bfloat16 halves the bytes of the float32 master weights), and every engine loads them in
place. Other transports (vLLM's weight-transfer API over NCCL or gloo) plug in
behind the same ``connect`` / ``push`` / ``restore`` / ``close``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import ray

TEACHER_EMA = "teacher_ema.safetensors"
# an engine that takes longer than this to load a version has hung: fail the step instead of the run waiting
LOAD_TIMEOUT_S = 1800.0


def _wait(refs: list, what: str) -> None:
    try:
        ray.get(refs, timeout=LOAD_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"weight sync: {what} did not finish within {LOAD_TIMEOUT_S:.0f} s") from None


class WeightSync:
    def __init__(self, learner, rollout_workers: Sequence, teacher=None, *, teacher_update: str = "current",
                 dtype: str = "float32"):
        """``learner``: the LearnerGroup (the weights' source); ``rollout_workers`` and ``teacher``
        (None without one): the actors that hold engines; ``teacher_update``: ``teacher.update``;
        ``dtype``: the engines' (``model.dtype``), in which the weights travel."""
        self.learner = learner
        self.rollout_workers = list(rollout_workers)
        self.teacher = teacher
        self.teacher_update = teacher_update
        self.dtype = dtype

    def connect(self) -> None:
        """Set the transport up (the object store needs nothing)."""

    def push(self, version: int) -> float:
        """The learners' weights, as policy ``version``, to every engine that follows the policy;
        returns the seconds it took."""
        t0 = time.perf_counter()
        state_ref = self.learner.weights_ref(self.dtype)
        targets = list(self.rollout_workers)
        if self.teacher is not None and self.teacher_update != "fixed":
            targets.append(self.teacher)  # an EMA teacher averages the new weights in
        _wait([t.update_weights.remote(state_ref, version) for t in targets], f"loading policy version {version}")
        return time.perf_counter() - t0

    def save(self, checkpoint_dir: str | Path) -> None:
        """What the engines hold that the learner's checkpoint does not: the EMA teacher's average."""
        if self.teacher is not None and self.teacher_update == "ema":
            _wait([self.teacher.save_ema.remote(str(Path(checkpoint_dir) / TEACHER_EMA))], "saving the EMA teacher")

    def restore(self, version: int, checkpoint_dir: str | Path) -> None:
        """After the learner loaded a checkpoint: the engines start from its weights, not the base
        model's, and an EMA teacher from its own saved average."""
        state_ref = self.learner.weights_ref(self.dtype)
        loads = [w.update_weights.remote(state_ref, version) for w in self.rollout_workers]
        if self.teacher is not None and self.teacher_update == "current":
            loads.append(self.teacher.update_weights.remote(state_ref, version))
        elif self.teacher is not None and self.teacher_update == "ema":
            loads.append(self.teacher.load_ema.remote(str(Path(checkpoint_dir) / TEACHER_EMA), version))
        _wait(loads, f"restoring version {version} from {checkpoint_dir}")

    def close(self) -> None:
        """Release the transport (nothing for the object store)."""
