"""The driver: the one place that knows the whole flow (DESIGN §2).

    for each step:
        prompts  ─► RolloutWorkers   n samples per prompt, streamed as each sample finishes
                 ─► FeedbackPool     each sample graded the moment it exists (reward + feedback text)
                 ─► TeacherScorer    each prompt's group, once complete: teacher top-k on the student's tokens
                 ─► ReplayQueue      the group's records by reference, tagged with the policy version
        LearnerGroup.train_step(batch from the queue)      FSDP2 ranks, the algorithm's loss
        weight sync ─► RolloutWorkers, TeacherScorer       the new policy version, through the object store
        evaluate every `eval_every` steps; checkpoint every `checkpoint_every` steps

Records move between actors as ObjectRefs: the driver routes references and reads only the small
routing header each rollout carries (its prompt), never the records. With ``max_staleness = s > 0``
a producer thread generates up to ``s`` rounds ahead of the learner; the queue drops and counts
anything older than ``s`` versions and the losses correct the rest with the behaviour log-probs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from omegaconf import OmegaConf

from distil_ray.algorithms import get_algorithm
from distil_ray.evaluation.metrics import aggregate_grades
from distil_ray.feedback.pool import FeedbackPool
from distil_ray.learner.group import LearnerGroup
from distil_ray.records import Graded, Prompt, Scored
from distil_ray.replay import ReplayQueue
from distil_ray.rollout.engine import SamplingConfig
from distil_ray.rollout.worker import RolloutWorker
from distil_ray.tasks import get_task
from distil_ray.tasks.prompts import PromptStream, to_prompts
from distil_ray.teacher.scorer import TeacherScorer
from distil_ray.telemetry import MetricsLogger, Progress
from distil_ray.telemetry.ray_metrics import DashboardMetrics

log = logging.getLogger("distil_ray.trainer")

CHECKPOINTS = "checkpoints"
TEACHER_EMA = "teacher_ema.safetensors"


def _plain(node) -> Any:
    """A config section as plain Python containers: actors take plain kwargs, not config objects."""
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


@ray.remote(num_cpus=0)
def _gather_group(*records: Graded) -> list[Scored]:
    """Without a teacher (grpo, sft): one ref for a prompt's whole group, so the learner keeps the
    group on one rank; records carry no teacher scores and no distillation signal."""
    return [Scored.from_graded(r) for r in records]


class StageClock:
    """Seconds per stage within one step; what the step took beyond them is driver/Ray overhead."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def timed(self, stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(stage, time.perf_counter() - t0)

    def total(self) -> float:
        return time.perf_counter() - self.start


class Trainer:
    def __init__(self, cfg, run_dir: str | os.PathLike):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.algorithm = get_algorithm(cfg.algorithm.name)
        self.version = 0  # policy version = number of weight syncs (one per generation batch trained on)
        self.step = 0
        self.best: dict[str, float] = {}
        self._producer: ThreadPoolExecutor | None = None
        self._rounds: list[Future] = []  # data rounds in flight, oldest first
        self._rounds_started = 0
        self._owns_ray = False

    # ------------------------------------------------------------------ the algorithm
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.setup()
        if self.step == 0 and cfg.trainer.eval_at_start:
            self.evaluate()
        progress = Progress(cfg.trainer.total_steps, start_step=self.step)
        while self.step < cfg.trainer.total_steps:
            metrics, stage_seconds = self.train_step()
            if self.step % cfg.logging.console_every == 0 or self.step == cfg.trainer.total_steps:
                progress.print(self.step, metrics, stage_seconds)
            if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0:
                self.evaluate()
            if cfg.trainer.checkpoint_every and self.step % cfg.trainer.checkpoint_every == 0:
                self.checkpoint()
        if not (cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0):
            self.evaluate()  # the final evaluation
        return self.finish()

    def setup(self) -> None:
        self._t_start = time.perf_counter()
        clock = StageClock()
        clock.timed("ray_start", self.start_ray)
        self.task = get_task(self.cfg.task.name, **_plain(self.cfg.task.kwargs))
        model_dir = clock.timed("model", self.prepare_model)  # incl. a warm start that is not cached yet
        clock.timed("data", self.load_prompts, model_dir)
        clock.timed("actors", self.start_actors, model_dir)
        clock.timed("resume", self.maybe_resume)
        self.startup_s = clock.total()
        self.metrics.log(self.step, {"time/startup_s": self.startup_s,
                                     **{f"time/startup/{k}_s": v for k, v in clock.seconds.items()}})

    def train_step(self) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step: data for it (produced now, or ahead of time when off-policy), the
        learners' update, and the weight sync that makes the next rollouts on-policy again."""
        cfg = self.cfg
        clock = StageClock()
        # generation runs up to `max_staleness` rounds ahead of the learner (0: strictly on-policy)
        while len(self._rounds) < 1 + cfg.replay.max_staleness and self._rounds_started < cfg.trainer.total_steps:
            self._rounds.append(self.start_round(self.stream.next_batch()))
        for stage, seconds in self._rounds.pop(0).result().items():
            clock.add(stage, seconds)

        refs = clock.timed("queue", self.take_batch)
        train_metrics = clock.timed("learner", self.update_policy, refs)
        self.version += 1
        self.step += 1
        clock.timed("sync", self.sync_weights)

        metrics = {**train_metrics, **ray.get(self.replay.stats.remote())}
        metrics["policy_version"] = float(self.version)
        metrics["replay/version_lag"] = float(self._last_lag)
        metrics.update({f"time/{stage}_s": s for stage, s in clock.seconds.items()})
        metrics["time/step_s"] = clock.total()
        metrics["time/overhead_s"] = max(0.0, clock.total() - sum(clock.seconds.values()))
        self.metrics.log(self.step, metrics)
        self.dashboard.record(metrics)
        return metrics, dict(clock.seconds)

    def finish(self) -> dict[str, Any]:
        self.checkpoint()
        if self.cfg.trainer.save_hf_at_end:
            self.learner.save_hf(str(self.run_dir / "hf_model"))
        summary = {
            "step": self.step,
            "wall_s": time.perf_counter() - self._t_start,
            "startup_s": self.startup_s,
            **self.best,
            **ray.get(self.replay.stats.remote()),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.shutdown()
        return summary

    # ------------------------------------------------------------------ set-up
    def start_ray(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(
                address=cfg.ray.address,
                num_cpus=cfg.ray.num_cpus if cfg.ray.address is None else None,
                include_dashboard=cfg.ray.include_dashboard,
                namespace=cfg.ray.namespace,
                log_to_driver=False,
            )
        self._check_cluster_cpus()
        self._link_actor_logs()
        self.dashboard = DashboardMetrics(run=self.run_dir.name)
        self.metrics = MetricsLogger(
            self.run_dir,
            wandb=cfg.logging.wandb,
            project=cfg.logging.wandb_project,
            mode=cfg.logging.wandb_mode,
            config=cfg,
        )

    def _check_cluster_cpus(self) -> None:
        from distil_ray.config import check_cpu_budget

        available = ray.cluster_resources().get("CPU", 0.0)
        check_cpu_budget(self.cfg, available, f"the cluster has {available:g} CPUs")

    def _link_actor_logs(self) -> None:
        """Every actor's stdout/stderr lives in Ray's session log dir; link it from the run dir."""
        try:
            logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        except Exception:  # a remote cluster: its logs are on its nodes
            return
        link = self.run_dir / "actor_logs"
        if not link.exists() and logs.is_dir():
            link.symlink_to(logs, target_is_directory=True)

    def prepare_model(self) -> str:
        """The policy's starting checkpoint: a hub/local model, or the tiny local model plus the
        task's supervised warm start (both built once and cached by their config)."""
        cfg = self.cfg
        if cfg.model.path is not None:
            return str(cfg.model.path)
        from distil_ray.models.tiny import TinyModelConfig, tiny_model_dir

        task = self.task
        # a task may offer lines of its own text for the tiny tokenizer: its prompts and feedback
        # then tokenise into a few tokens per word, as a real LLM's vocabulary would
        corpus = tuple(task.tokenizer_corpus()) if hasattr(task, "tokenizer_corpus") else ()
        model_dir = tiny_model_dir(TinyModelConfig(**_plain(cfg.model.tiny), extra_corpus=corpus))
        if cfg.warm_start.enabled:
            from distil_ray.models.warm_start import WarmStartConfig, warm_start_dir

            t0 = time.perf_counter()
            model_dir = warm_start_dir(model_dir, task, WarmStartConfig(**_plain(cfg.warm_start)))
            log.info("warm start ready in %.1f s: %s", time.perf_counter() - t0, model_dir)
        return str(model_dir)

    def load_prompts(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model_dir, local_files_only=cfg.model.path is None)
        task = self.task
        train, val = task.load(cfg.task.train_split), task.load(cfg.task.val_split)
        if cfg.eval.max_prompts is not None:
            val = val[: cfg.eval.max_prompts]
        self.train_prompts = self._within_length(to_prompts(train, tokenizer), "train")
        self.val_prompts = self._within_length(to_prompts(val, tokenizer), "validation")
        self.examples = {ex.uid: ex for ex in train + val}
        self.stream = PromptStream(self.train_prompts, cfg.trainer.prompts_per_step, seed=cfg.seed)
        log.info("%d train prompts, %d validation prompts", len(self.train_prompts), len(self.val_prompts))

    def _within_length(self, prompts: list[Prompt], split: str) -> list[Prompt]:
        limit = self.cfg.task.max_prompt_tokens
        if limit is None:
            return prompts
        kept = [p for p in prompts if len(p.prompt_ids) <= limit]
        if len(kept) < len(prompts):
            log.warning("%d of %d %s prompts are longer than task.max_prompt_tokens=%d and are left out",
                        len(prompts) - len(kept), len(prompts), split, limit)
        self.metrics.log(0, {f"data/{split}_prompts_too_long": float(len(prompts) - len(kept))})
        return kept

    def start_actors(self, model_dir: str) -> None:
        cfg = self.cfg
        rollout_actor = ray.remote(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus)(RolloutWorker)
        engine_kwargs = {"dtype": cfg.model.dtype, "seed": cfg.seed}
        if cfg.rollout.engine == "vllm":
            engine_kwargs.update(kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes, max_num_seqs=cfg.rollout.max_num_seqs)
        self.rollout_workers = [
            rollout_actor.options(name=f"rollout-{i}").remote(model_dir, engine=cfg.rollout.engine, engine_kwargs=engine_kwargs)
            for i in range(cfg.rollout.num_workers)
        ]
        self.feedback = FeedbackPool(
            cfg.task.name, _plain(cfg.task.kwargs), num_workers=cfg.feedback.num_workers, num_cpus=cfg.feedback.num_cpus
        )
        self.teacher = None
        if self.algorithm.needs_teacher:
            backend_kwargs = {"dtype": cfg.model.dtype}
            if cfg.teacher.backend == "vllm":
                backend_kwargs["kv_cache_memory_bytes"] = cfg.teacher.kv_cache_memory_bytes
                backend_kwargs["max_logprobs"] = max(cfg.teacher.topk, 20)
            self.teacher = ray.remote(num_cpus=cfg.teacher.num_cpus, num_gpus=cfg.teacher.num_gpus)(TeacherScorer).options(name="teacher").remote(
                model_dir,
                backend=cfg.teacher.backend,
                topk=cfg.teacher.topk,
                context=cfg.teacher.context,
                reprompt=_plain(cfg.teacher.reprompt),
                backend_kwargs=backend_kwargs,
                max_context_tokens=cfg.teacher.max_context_tokens,
                update=cfg.teacher.update,
                ema_rate=cfg.teacher.ema_rate,
            )
        self.replay = ray.remote(num_cpus=0)(ReplayQueue).options(name="replay").remote(
            capacity=cfg.replay.capacity, max_staleness=cfg.replay.max_staleness
        )
        self.learner = LearnerGroup(
            model_dir,
            world_size=cfg.learner.world_size,
            num_cpus_per_rank=cfg.learner.num_cpus,
            num_gpus_per_rank=cfg.learner.num_gpus,
            algorithm=cfg.algorithm.name,
            loss_kwargs=_plain(cfg.algorithm.loss),
            advantage_kwargs=_plain(cfg.algorithm.advantages),
            lr=cfg.learner.lr,
            weight_decay=cfg.learner.weight_decay,
            betas=tuple(cfg.learner.betas),
            warmup_steps=cfg.learner.warmup_steps,
            grad_clip=cfg.learner.grad_clip,
            micro_batch_size=cfg.learner.micro_batch_size,
            logprob_chunk_size=cfg.learner.logprob_chunk_size,
            temperature=cfg.rollout.temperature,
            backend=cfg.learner.backend,
            dtype=cfg.learner.dtype,
            seed=cfg.seed,
        )
        # the examples' reference data (answer keys, tests) goes into the object store once
        self.example_refs = {uid: ray.put(ex) for uid, ex in self.examples.items()}
        self.prompt_refs = {p.uid: ray.put(p) for p in self.train_prompts}
        self._producer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="producer")

    # ------------------------------------------------------------------ one round of data
    def sampling(self, *, evaluation: bool = False, seed: int | None = None) -> SamplingConfig:
        r, e = self.cfg.rollout, self.cfg.eval
        if evaluation:
            return SamplingConfig(
                n=e.n_samples, temperature=e.temperature, top_p=e.top_p,
                max_new_tokens=e.max_new_tokens or r.max_new_tokens, stop=tuple(r.stop), seed=seed,
            )
        return SamplingConfig(
            n=r.n_samples, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens, stop=tuple(r.stop), seed=seed,
        )

    def start_round(self, prompts: list[Prompt]) -> Future:
        self._rounds_started += 1
        seed = self.cfg.seed * 1_000_003 + self._rounds_started  # a resumed run samples what it would have
        return self._producer.submit(self.produce, prompts, seed)

    def stream_rollouts(self, prompts: list[Prompt], sampling: SamplingConfig, version: int):
        """``(prompt uid, Rollout ref)`` in completion order across all rollout workers."""
        workers = self.rollout_workers
        chunks = [prompts[i :: len(workers)] for i in range(len(workers))]
        streams = [
            w.stream.options(num_returns="streaming").remote(chunk, sampling, version)
            for w, chunk in zip(workers, chunks)
            if chunk
        ]
        while streams:
            ready, _ = ray.wait(streams, num_returns=1)
            stream = ready[0]
            try:
                header_ref = next(stream)
            except StopIteration:
                streams.remove(stream)
                continue
            # each rollout is preceded by a small header naming its prompt: the driver routes by it
            # and never pulls the record itself
            uid = ray.get(header_ref)
            yield uid, next(stream)

    def produce(self, prompts: list[Prompt], seed: int) -> dict[str, float]:
        """Generate, grade and score one round; the finished groups go into the replay queue.
        Returns the seconds each stage took."""
        t0 = time.perf_counter()
        version = self.version  # the weights this round samples with (the last sync finished before it)
        sampling = self.sampling(seed=seed)
        groups: dict[str, list[ray.ObjectRef]] = defaultdict(list)
        scored: list[ray.ObjectRef] = []  # one ref per complete group (a list of records)
        graded_all: list[ray.ObjectRef] = []
        for uid, rollout_ref in self.stream_rollouts(prompts, sampling, version):
            graded_ref = self.feedback.grade_ref(self.example_refs[uid], rollout_ref)
            graded_all.append(graded_ref)
            groups[uid].append(graded_ref)
            if len(groups[uid]) == sampling.n:  # the group is complete: on to the teacher
                if self.teacher is not None:
                    scored.append(self.teacher.score_group.remote(self.prompt_refs[uid], *groups[uid]))
                else:  # no teacher (grpo, sft): the group's graded records, gathered under one ref
                    scored.append(_gather_group.remote(*groups[uid]))
        t_rollout = time.perf_counter()
        ray.wait(graded_all, num_returns=len(graded_all), fetch_local=False)
        t_feedback = time.perf_counter()
        ray.wait(scored, num_returns=len(scored), fetch_local=False)
        t_teacher = time.perf_counter()
        ray.get([self.replay.put.remote([ref], sampling.n, version) for ref in scored])
        return {
            "rollout": t_rollout - t0,
            "feedback": t_feedback - t_rollout,
            # without a teacher this is the gathering of each group under one ref
            ("teacher" if self.teacher is not None else "group"): t_teacher - t_feedback,
        }

    def take_batch(self) -> list[ray.ObjectRef]:
        refs, versions = ray.get(self.replay.get.remote(self.cfg.trainer.prompts_per_step, self.version))
        if not refs:
            raise RuntimeError("the replay queue served no data: every group was too stale")
        # how many policy versions behind the learner the batch was sampled (0 when on-policy)
        self._last_lag = sum(self.version - v for v in versions) / len(versions)
        return refs

    def update_policy(self, refs: list[ray.ObjectRef]) -> dict[str, float]:
        """``learner.updates_per_batch`` optimizer steps, each on its own share of the batch's groups;
        counts add up over the updates, everything else is averaged."""
        k = self.cfg.learner.updates_per_batch
        per_update = [self.learner.train_step(refs[i::k]) for i in range(k)]
        out = {}
        for key in per_update[0]:
            values = [m[key] for m in per_update if key in m]
            counted = key.endswith(("num_tokens", "num_sequences", "num_samples", "num_micro_batches"))
            out[key] = sum(values) if counted else sum(values) / len(values)
        out["learner/updates"] = float(k)
        return out

    def sync_weights(self) -> float:
        """The learners' new weights to every engine, by one object-store reference."""
        t0 = time.perf_counter()
        state_ref = self.learner.state_dict_ref()
        targets = list(self.rollout_workers)
        if self.teacher is not None and self.cfg.teacher.update != "fixed":
            targets.append(self.teacher)  # an EMA teacher averages the new weights in
        ray.get([t.update_weights.remote(state_ref, self.version) for t in targets])
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        prompts = self.val_prompts
        sampling = self.sampling(evaluation=True, seed=self.cfg.seed)
        graded_refs: dict[str, list[ray.ObjectRef]] = defaultdict(list)
        for uid, rollout_ref in self.stream_rollouts(prompts, sampling, self.version):
            graded_refs[uid].append(self.feedback.grade_ref(self.example_refs[uid], rollout_ref))
        grades = []
        for p in prompts:
            group = sorted(ray.get(graded_refs[p.uid]), key=lambda g: g.sample_index)
            grades.append(group)
        domains = [p.meta.get("domain") for p in prompts]
        metrics = aggregate_grades(grades, groups=domains if all(domains) else None)
        metrics = {f"val/{k}": v for k, v in metrics.items()}
        metrics["time/eval_s"] = time.perf_counter() - t0
        if self.cfg.eval.keep_best and metrics["val/accuracy"] > self.best.get("val/best_accuracy", -1.0):
            self.best = {"val/best_accuracy": metrics["val/accuracy"], "val/best_step": float(self.step)}
            if self.cfg.eval.save_best:
                self.learner.save_hf(str(self.run_dir / "best_model"))
        metrics.update(self.best)
        self.metrics.log(self.step, metrics)
        self.dashboard.record(metrics)
        print(
            f"eval step {self.step}: val/accuracy {metrics['val/accuracy']:.3f} "
            f"({len(prompts)} prompts × {sampling.n}, {metrics['time/eval_s']:.1f} s)",
            flush=True,
        )
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINTS / f"step_{self.step:06d}"
        extra = {"step": self.step, "version": self.version, "data": self.stream.state(), "best": self.best,
                 "rounds_started": self._rounds_started}
        t0 = time.perf_counter()
        self.learner.save_checkpoint(str(path), extra)
        if self.teacher is not None and self.cfg.teacher.update == "ema":
            ray.get(self.teacher.save_ema.remote(str(path / TEACHER_EMA)))
        (path.parent / "latest").write_text(path.name)
        self.metrics.log(self.step, {"time/checkpoint_s": time.perf_counter() - t0})

    def maybe_resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume == "never":
            return
        if resume == "auto":
            latest = self.run_dir / CHECKPOINTS / "latest"
            if not latest.exists():
                log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", self.run_dir)
                return
            path = latest.parent / latest.read_text().strip()
        else:
            path = Path(resume)
        extra = self.learner.load_checkpoint(str(path))
        self.step, self.version = int(extra["step"]), int(extra["version"])
        self.stream.load_state(extra["data"])
        self.best = dict(extra.get("best", {}))
        self._rounds_started = int(extra.get("rounds_started", self.step))
        # the engines start from the checkpoint's weights, not the base model's; an EMA teacher
        # from its own saved average (averaging the policy in once more would change it)
        state_ref = self.learner.state_dict_ref()
        loads = [w.update_weights.remote(state_ref, self.version) for w in self.rollout_workers]
        if self.teacher is not None and self.cfg.teacher.update == "current":
            loads.append(self.teacher.update_weights.remote(state_ref, self.version))
        elif self.teacher is not None and self.cfg.teacher.update == "ema":
            loads.append(self.teacher.load_ema.remote(str(path / TEACHER_EMA), self.version))
        ray.get(loads)
        print(f"resumed from {path} at step {self.step}", flush=True)

    def shutdown(self) -> None:
        if self._producer is not None:
            self._producer.shutdown(wait=True)
        self.metrics.close()
        self.learner.shutdown()
        self.feedback.shutdown()
        for actor in self.rollout_workers + ([self.teacher] if self.teacher is not None else []) + [self.replay]:
            ray.kill(actor)
        if self._owns_ray:  # a multirun's next job starts a clean cluster
            ray.shutdown()
