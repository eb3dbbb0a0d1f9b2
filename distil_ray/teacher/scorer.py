"""TeacherScorer: turns a graded sibling group into Scored records (DESIGN §2, §4).

For every rollout of one prompt it builds the teacher's context (SDPO's reprompt with a
successful sibling's answer or the environment's feedback, or OPSD's reference solution),
chat-templates it, appends the student's response token ids exactly as sampled, and asks its
engine (``distil_ray.engines``) for the top-k log-probs at every response position. Rollouts
without any signal keep correctly shaped zero arrays and ``distill_mask=False``; they are not sent
to the engine. With ``teacher.backend=learner`` there is no engine: the records carry their
teacher context (``teacher_prompt_ids``) and the learner ranks score them inside the training step
(``LearnerWorker.score_teacher``).

A plain class; the driver runs it in :class:`~distil_ray.teacher.actor.TeacherActor`, which
batches the groups queued while the engine is busy into one :meth:`TeacherScorer.score_groups` call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from distil_ray.config import TeacherConfig
from distil_ray.engines import EngineOptions, build_engine
from distil_ray.engines.base import EngineHolder, Weights, as_weights, configure_threads, restarted_actor
from distil_ray.feedback.templates import TeacherContext, reference_solution_context, reprompt_group
from distil_ray.records import Graded, Prompt, Scored


class TeacherScorer(EngineHolder):
    def __init__(self, model_path: str, cfg: TeacherConfig, *, dtype: str = "float32", seed: int = 0,
                 weight_transfer: str | None = None, chat_template_kwargs: dict | None = None):
        """``cfg``: the ``teacher`` section (backend, context, top-k, how its weights follow the
        policy); ``dtype``/``seed``: the model's compute dtype and the run's seed;
        ``weight_transfer``: as for the rollout workers (a teacher that follows the policy);
        ``chat_template_kwargs``: as the student's prompts got them (``model.enable_thinking``)."""
        cfg.check()
        self.cfg = cfg
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.model_path = model_path
        from transformers import AutoTokenizer

        # Threads first: a vLLM CPU backend disables torch.set_num_threads once it is built.
        self.num_threads = configure_threads()
        # vLLM sizes its log-prob buffers by max_logprobs; 20 is its own default
        options = EngineOptions(dtype=dtype, seed=seed, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
                                max_logprobs=max(cfg.topk, 20), max_model_len=cfg.max_model_len,
                                enforce_eager=cfg.enforce_eager, weight_transfer=weight_transfer)
        if cfg.backend == "http":  # the black-box expert (engines/http.py)
            from distil_ray.engines.http import HTTPEngine

            self.engine = HTTPEngine(model_path, cfg.http)
        elif cfg.backend == "learner":  # contexts only: the learner ranks run the teacher's forward
            self.engine = None
        else:
            self.engine = build_engine(cfg.backend, model_path, options)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        # vLLM needs room for the one token a scoring request generates: context + response must
        # stay below the engine's length limit, not reach it
        engine_limit = cfg.max_model_len
        if engine_limit is None and cfg.backend == "http":
            engine_limit = self.engine.max_model_len  # what the expert's server reports, if it does
        if engine_limit is None:
            from transformers import AutoConfig

            engine_limit = getattr(AutoConfig.from_pretrained(model_path, local_files_only=True),
                                   "max_position_embeddings", None)
        limits = [n for n in (cfg.max_context_tokens, None if engine_limit is None else engine_limit - 1)
                  if n is not None]
        max_context_tokens = min(limits) if limits else None
        # teacher context + response longer than this is not scored (no signal, counted as too_long):
        # a long reference solution or trace must not take the run down
        self.max_context_tokens = max_context_tokens
        self._version = 0
        # a restarted actor lost the weights a sync gave it: it scores again once they are resent
        self.awaiting_weights = cfg.follows_policy and restarted_actor()
        self._last_contexts: list[list[int] | None] = []
        self._stats = {"scored": 0, "no_signal": 0, "used_solution": 0, "used_feedback": 0, "too_long": 0, "score_seconds": 0.0}

    # ----------------------------------------------------------------------------------------

    def _contexts(self, prompt: Prompt, graded: list[Graded]) -> list[TeacherContext]:
        if self.cfg.context == "reference_solution":
            reference = prompt.reference or {}
            context = reference_solution_context(prompt.messages, reference.get("solution"),
                                                 problem=reference.get("problem"))
            return [context] * len(graded)
        return reprompt_group(
            prompt.messages,
            [g.text for g in graded],
            [float(g.reward) for g in graded],
            [g.feedback or None for g in graded],
            self.cfg.reprompt,
        )

    def teacher_prompt_ids(self, ctx: TeacherContext) -> list[int]:
        ids = self.tokenizer.apply_chat_template(ctx.messages, add_generation_prompt=True, return_dict=False,
                                                 **self.chat_template_kwargs)
        return [int(t) for t in ids]

    def score_group(self, prompt: Prompt, *graded: Graded | list[Graded]) -> list[Scored]:
        """Score all rollouts of one prompt (the sibling group); records come back in input order.

        Takes the group as one list, ``score_group(prompt, group)``, or record by record,
        ``score_group(prompt, *group)``: Ray resolves ObjectRefs passed as top-level arguments,
        so a driver holding one ref per rollout passes them that way.
        """
        group = list(graded[0]) if len(graded) == 1 and isinstance(graded[0], (list, tuple)) else list(graded)
        return self.score_groups([(prompt, group)])[0]

    def score_groups(self, groups: Sequence[tuple[Prompt, Sequence[Graded]]]) -> list[list[Scored]]:
        """Score several prompt groups with one engine call (the engine batches every response of
        every group); one list of records per group, in input order."""
        self.check_weights("teacher")
        requests: list[tuple[list[int], list[int]]] = []  # (teacher prompt, response) for the engine
        plans = []  # per group: its records, contexts, which rollouts were sent (index into requests)
        contexts_seen: list[list[int] | None] = []
        for prompt, graded in groups:
            graded = list(graded)
            for g in graded:
                if g.prompt_uid != prompt.uid:
                    raise ValueError(f"rollout of prompt {g.prompt_uid!r} passed in the group of prompt {prompt.uid!r}")
            contexts = self._contexts(prompt, graded)
            sent: dict[int, int] = {}
            too_long = set()
            for i, (g, ctx) in enumerate(zip(graded, contexts)):
                if not (ctx.has_signal and len(g.response_ids) > 0):
                    contexts_seen.append(None)
                    continue
                tp = self.teacher_prompt_ids(ctx)
                response = np.asarray(g.response_ids).astype(np.int64).tolist()  # exact student tokens
                if self.max_context_tokens is not None and len(tp) + len(response) > self.max_context_tokens:
                    too_long.add(i)
                    self._stats["too_long"] += 1
                    contexts_seen.append(None)
                    continue
                sent[i] = len(requests)
                requests.append((tp, response))
                contexts_seen.append(tp + response)
            plans.append((graded, contexts, sent, too_long))
        self._last_contexts = contexts_seen
        if self.engine is None:  # scored on the learner
            return [self._records(graded, contexts, {}, too_long, {i: requests[j][0] for i, j in sent.items()})
                    for graded, contexts, sent, too_long in plans]
        start = time.perf_counter()
        scores = self.engine.score_topk([p for p, _ in requests], [r for _, r in requests], self.cfg.topk) if requests else []
        self._stats["score_seconds"] += time.perf_counter() - start
        return [self._records(graded, contexts, {i: scores[j] for i, j in sent.items()}, too_long,
                              {i: requests[j][0] for i, j in sent.items()})
                for graded, contexts, sent, too_long in plans]

    def _records(self, graded, contexts, scores: dict, too_long: set, teacher_prompts: dict) -> list[Scored]:
        k = self.cfg.topk
        out = []
        for i, (g, ctx) in enumerate(zip(graded, contexts)):
            T = len(g.response_ids)
            s = scores.get(i)
            to_score_later = self.engine is None and i in teacher_prompts
            if to_score_later:  # the learner fills the top-k (k columns) from the context
                top_ids, top_lp, token_lp = np.zeros((T, 0), np.int32), np.zeros((T, 0), np.float32), np.zeros(0, np.float32)
            elif s is not None:
                kk = s.topk_ids.shape[1]
                top_ids = np.zeros((T, k), np.int32)
                top_lp = np.zeros((T, k), np.float32)
                # a vocabulary smaller than k leaves trailing columns at zero (masked by the learner's k)
                top_ids[:, :kk] = s.topk_ids.numpy()
                top_lp[:, :kk] = s.topk_logprobs.numpy()
                token_lp = s.token_logprobs.numpy().astype(np.float32)
                self._stats["scored"] += 1
            else:
                top_ids, top_lp, token_lp = np.zeros((T, k), np.int32), np.zeros((T, k), np.float32), np.zeros(T, np.float32)
            if not ctx.has_signal:
                self._stats["no_signal"] += 1
            self._stats["used_solution"] += int(ctx.used_solution)
            self._stats["used_feedback"] += int(ctx.used_feedback)
            # the sibling solution in the teacher's context (never the sample's own) is its demonstration
            record = dataclasses.replace(g, demonstration=ctx.demonstration) if ctx.demonstration is not None else g
            out.append(
                Scored.from_graded(
                    record,
                    teacher_topk_ids=top_ids,
                    teacher_topk_logprobs=top_lp,
                    teacher_token_logprobs=token_lp,
                    distill_mask=bool(ctx.has_signal and T > 0 and i not in too_long),
                    teacher_prompt_ids=np.asarray(teacher_prompts.get(i, ()), np.int32),
                )
            )
        return out

    def context_ids(self, prompt: Prompt, graded: Sequence[Graded]) -> list[list[int] | None]:
        """The teacher's chat-templated context for each rollout of a group (None where it would
        have no signal), without scoring anything: what the generation logs show."""
        return [self.teacher_prompt_ids(ctx) if ctx.has_signal else None for ctx in self._contexts(prompt, list(graded))]

    def last_teacher_contexts(self) -> list[list[int] | None]:
        """The full teacher sequences (context + response ids) of the last ``score_group`` call,
        one per record (None where the record had no signal)."""
        return [None if c is None else list(c) for c in self._last_contexts]

    # ----------------------------------------------------------------------------------------

    def update_weights(self, state: Weights | dict[str, np.ndarray], version: int) -> float:
        """Load the weights a sync sends: the policy (``update="current"``) or the learners' moving
        average of it (``update="ema"``, learner/weight_sync.py). A fixed teacher, and one the
        learner runs (no engine here), ignore them. Returns the seconds spent loading."""
        if self.cfg.update == "fixed" or self.engine is None:
            return 0.0
        start = time.perf_counter()
        self.engine.load_weights(as_weights(state).tensors())
        self._version = int(version)
        self.awaiting_weights = False
        return time.perf_counter() - start

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        if self.engine is None:
            raise RuntimeError("teacher.backend=learner: the teacher's log-probs are computed on the learner ranks")
        return self.engine.sequence_logprobs([int(t) for t in prompt_ids], [int(t) for t in response_ids])

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)
