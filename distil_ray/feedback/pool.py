"""FeedbackPool: a task's grader running in a pool of named Ray actors, streaming.

``Grader`` is a plain class (tests drive it without Ray); ``FeedbackPool`` puts one ``Grader`` in
each of N actors, hands every rollout to the next idle actor, and gives results back in
completion order — a slow program under test never holds up the grading of the
samples behind it. Code execution inside a grader goes through the sandbox, so N actors run N
sandboxed programs at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable, Iterator

import ray
from ray.util import ActorPool

from distil_ray.config import FeedbackConfig, TaskConfig
from distil_ray.records import Graded, Prompt, Rollout
from distil_ray.tasks import TaskExample


class Grader:
    """Grades rollouts of one task into ``Graded`` records; ``cfg``: the ``task`` section."""

    def __init__(self, cfg: TaskConfig):
        from distil_ray.feedback.sandbox import sweep_leftovers

        # a grader killed mid-run (this one's previous incarnation, or another run's) leaves its
        # sandbox directories and cgroups: the next one on the node removes them
        try:
            sweep_leftovers()
        except Exception as e:  # noqa: BLE001 - cleaning up after others must never stop a grader
            logging.getLogger(__name__).warning("sweeping sandbox leftovers failed: %s", e)
        self.task = cfg.build()

    def close(self) -> None:
        """Stop the sandboxes this process keeps for the next responses (code tasks)."""
        from distil_ray.feedback.code.harness import close_idle_sandboxes

        close_idle_sandboxes()

    def grade(self, example: TaskExample | Prompt, rollout: Rollout) -> Graded:
        """Grade one rollout against its example (or the Prompt that carries it)."""
        if isinstance(example, Prompt):
            example = example.example
        grade = self.task.grade(example, rollout.text)
        return Graded.from_rollout(
            rollout,
            reward=float(grade.reward),
            correct=bool(grade.correct),
            score=float(grade.score),
            feedback=grade.feedback,
            answer=grade.answer,
            sandbox_error=bool((grade.details or {}).get("sandbox_error", False)),
        )


class FeedbackPool:
    """``num_workers`` grader actors named ``{name}-{i}`` (what the Ray dashboard shows).

    Dispatch is pull-based (``ray.util.ActorPool``): an actor receives the next rollout only when
    it is idle, so a program that runs into its time limit occupies one actor while the others
    keep grading. ``num_cpus`` is per actor; fractional values let several share a small machine.
    """

    def __init__(self, task: TaskConfig, cfg: FeedbackConfig, *, name: str = "feedback", max_restarts: int = 0):
        """``task``: the ``task`` section (what each grader builds); ``cfg``: the ``feedback``
        section (how many actors, their CPU share); ``max_restarts``: how often Ray restarts a
        grader whose process died. Grading is a pure function of its inputs, so the calls a dead
        grader held are simply run again on its restarted self."""
        cfg.check()
        actor = ray.remote(num_cpus=cfg.num_cpus, resources=dict(cfg.resources) or None, max_restarts=max_restarts,
                           max_task_retries=max_restarts)(Grader)
        self.name = name
        self.workers = [actor.options(name=f"{name}-{i}").remote(task) for i in range(cfg.num_workers)]
        self._pool = ActorPool(self.workers)
        self._in_flight: list[list[ray.ObjectRef]] = [[] for _ in self.workers]
        self._lock = threading.Lock()  # the driver grades from its producer thread and its evaluation

    def grade_ref(self, example: TaskExample | ray.ObjectRef, rollout: Rollout | ray.ObjectRef) -> ray.ObjectRef:
        """Grade one rollout on the actor with the fewest grading calls in flight; returns the
        ``Graded`` record's ObjectRef at once, so the record can go on to the teacher by reference
        without passing through the caller. (``submit`` is the pull-based variant that returns values.)
        """
        with self._lock:
            for refs in self._in_flight:
                if refs:
                    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                    finished = set(done)
                    refs[:] = [r for r in refs if r not in finished]
            index = min(range(len(self.workers)), key=lambda i: len(self._in_flight[i]))
            ref = self.workers[index].grade.remote(example, rollout)
            self._in_flight[index].append(ref)
            return ref

    def holder(self, ref: ray.ObjectRef) -> str | None:
        """The name of the grader actor a ``grade_ref`` result is still waiting on (None if done
        or unknown): what a deadline names."""
        with self._lock:
            for i, refs in enumerate(self._in_flight):
                if ref in refs:
                    return f"{self.name}-{i}"
        return None

    def submit(self, example: TaskExample | ray.ObjectRef, rollout: Rollout | ray.ObjectRef) -> None:
        """Queue one rollout for grading; it starts as soon as an actor is free.

        Pass the example as an ObjectRef (``ray.put`` once per prompt) when its reference data is
        large (code tests): every sample of the prompt then shares one copy in the object store.
        """
        self._pool.submit(lambda worker, job: worker.grade.remote(*job), (example, rollout))

    def as_completed(self) -> Iterator[Graded]:
        """Yield the graded records of everything submitted, each as soon as it is done."""
        while self._pool.has_next():
            yield self._pool.get_next_unordered()

    def grade_all(self, pairs: Iterable[tuple[TaskExample | ray.ObjectRef, Rollout]]) -> list[Graded]:
        """Grade every (example, rollout) pair in parallel; results in the order given."""
        return list(self._pool.map(lambda worker, job: worker.grade.remote(*job), list(pairs)))

    def shutdown(self) -> None:
        # ray.kill skips the actors' exit handlers: first let each stop its spare sandbox
        try:
            ray.get([w.close.remote() for w in self.workers], timeout=10)
        except Exception as e:  # noqa: BLE001 - a stuck or dead actor is killed all the same
            logging.getLogger(__name__).warning("closing the graders' sandboxes failed: %s", e)
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
