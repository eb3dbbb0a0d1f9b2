"""TeacherActor: the Ray shell around :class:`~distil_ray.teacher.scorer.TeacherScorer` that keeps
every group of a round in flight and scores them in batches.

The driver sends each prompt group the moment it is graded. A plain actor would score them one
engine call at a time, the engine idling between calls and each call a small batch. Here each
call only queues its group; one worker thread takes *everything queued so far* and scores it in
one engine call (``TeacherScorer.score_groups``), so while one batch is on the engine the next
accumulates. The engine and the scorer are touched by that one thread only (vLLM's in-process
engine is not thread-safe): weight loads and the other calls queue behind the batch in flight.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class TeacherActor:
    def __init__(self, *args, **kwargs):
        from distil_ray.teacher.scorer import TeacherScorer

        self.scorer = TeacherScorer(*args, **kwargs)
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-engine")
        self._queued: list[tuple[Any, list, asyncio.Future]] = []
        self._draining = False
        self._calls = self._groups = 0  # engine calls and the groups they scored, for stats

    async def _on_engine(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    async def score_group(self, prompt, *graded) -> list:
        """Score one prompt's group (as ``TeacherScorer.score_group``), batched with whatever else
        is queued when the engine is next free."""
        group = list(graded[0]) if len(graded) == 1 and isinstance(graded[0], (list, tuple)) else list(graded)
        for g in group:  # a malformed group fails its own caller here, never a whole batch
            if g.prompt_uid != prompt.uid:
                raise ValueError(f"rollout of prompt {g.prompt_uid!r} passed in the group of prompt {prompt.uid!r}")
        future = asyncio.get_running_loop().create_future()
        self._queued.append((prompt, group, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def score_group_with_header(self, prompt, *graded) -> tuple[int, list]:
        """``score_group``, called with ``num_returns=2``: a tiny header (the group's size) and the
        records, so the driver learns whether the call failed (e.g. this actor died and was
        restarted) from the header alone, never fetching the records."""
        scored = await self.score_group(prompt, *graded)
        return len(scored), scored

    async def _drain(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    results = await self._score(batch)
                except Exception:  # noqa: BLE001 - one bad group: score the groups one by one
                    for item in batch:
                        try:
                            (scored,) = await self._score([item])
                            _resolve(item[2], result=scored)
                        except Exception as e:  # noqa: BLE001 - that caller hears of it
                            _resolve(item[2], error=e)
                    continue
                for (_, _, future), scored in zip(batch, results):
                    _resolve(future, result=scored)
        finally:
            self._draining = False

    async def _score(self, batch) -> list:
        self._calls += 1
        self._groups += len(batch)
        return await self._on_engine(self.scorer.score_groups, [(p, g) for p, g, _ in batch])

    # everything else runs on the engine thread too, in arrival order

    async def update_weights(self, state, version: int) -> float:
        return await self._on_engine(self.scorer.update_weights, state, version)

    async def weight_transfer(self, phase: str, info: dict | None = None, version: int | None = None) -> None:
        return await self._on_engine(self.scorer.weight_transfer, phase, info, version)

    async def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        return await self._on_engine(self.scorer.sequence_logprobs, prompt_ids, response_ids)

    async def context_ids(self, prompt, graded: list) -> list:
        return self.scorer.context_ids(prompt, graded)  # tokenizer only: no need to queue for the engine

    async def last_teacher_contexts(self):
        """The teacher sequences of the last engine call: every group of its batch, in order."""
        return await self._on_engine(self.scorer.last_teacher_contexts)

    async def version(self) -> int:
        return self.scorer.version()

    async def stats(self) -> dict[str, Any]:
        stats = self.scorer.stats()
        stats["engine_calls"] = self._calls
        stats["groups_per_call"] = self._groups / self._calls if self._calls else 0.0
        return stats


def _resolve(future: asyncio.Future, *, result=None, error: BaseException | None = None) -> None:
    if future.done():  # its caller went away (cancelled): nothing to tell
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
