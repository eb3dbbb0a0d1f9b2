"""The run configuration: one structured (dataclass) schema, composed by Hydra, validated at start-up.

``conf/`` holds the Hydra tree (``config.yaml`` + the ``algorithm``, ``task``, ``model`` and
``experiment`` groups); the dataclasses below are its schema, registered in Hydra's ConfigStore as
``run_config_schema`` so that composition itself rejects an unknown key or a value of the wrong
type. :func:`validate` then checks what a type cannot express (choices, ranges, the keyword
arguments of the selected loss and task) so that a wrong key or value fails before any actor
starts, with a :class:`ConfigError` naming the key and the allowed values.

``compose_config(["+experiment=tiny", "rollout.n_samples=2"])`` gives a validated
:class:`RunConfig` without going through ``main`` (tests, notebooks, scripts).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from distil_ray.feedback.templates import RepromptConfig

SCHEMA_NAME = "run_config_schema"

# --------------------------------------------------------------------------- schema


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start a local cluster; "auto" or "ray://host:port" to join one
    num_cpus: Optional[int] = None  # local cluster only; None lets Ray count the cores
    include_dashboard: bool = False
    namespace: str = "distil_ray"


@dataclass
class TinyConfig:
    """Shape of the locally built tiny model (``distil_ray.models.tiny.TinyModelConfig``)."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    intermediate_size: int = 128
    seed: int = 0


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF directory or hub id; None builds the tiny model locally
    tiny: TinyConfig = field(default_factory=TinyConfig)
    dtype: str = "float32"  # float32 | bfloat16
    tokenizer: Optional[str] = None  # None: the model's own


@dataclass
class WarmStartConfig:
    """Supervised pre-training of the tiny model on the task's references, so RL starts from a
    policy that sometimes succeeds (a random tiny model never does)."""

    # the fields and defaults of distil_ray.models.warm_start.WarmStartConfig (a test keeps them
    # equal; that module imports torch, which the config must not), except that it is off by default
    enabled: bool = False
    steps: int = 1000
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0
    # share of the examples whose user turn is a teacher context (a sibling's solution or feedback):
    # this is where the tiny model learns to read feedback, as a pretrained LLM can
    context_fraction: float = 0.6


@dataclass
class TaskConfig:
    name: str = "toy"
    kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the task's constructor
    train_split: str = "train"
    val_split: str = "test"
    # prompts longer than this many tokens (chat template included) are left out, and counted
    max_prompt_tokens: Optional[int] = None


@dataclass
class AlgorithmConfig:
    name: str = "distil"
    loss: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the loss function
    advantages: Dict[str, Any] = field(default_factory=dict)  # of group_relative_advantages


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm | hf
    num_workers: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0  # per worker; 1 on a GPU node
    n_samples: int = 4  # rollouts per prompt (a group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    stop: List[str] = field(default_factory=list)
    kv_cache_memory_bytes: int = 64 * 2**20
    max_num_seqs: int = 64


@dataclass
class FeedbackConfig:
    num_workers: int = 1
    num_cpus: float = 0.25


def _reprompt_default(name: str):
    # Defaults are read from RepromptConfig itself so that the two can never drift apart.
    return getattr(RepromptConfig, name)


@dataclass
class RepromptSchema:
    """Mirror of ``distil_ray.feedback.templates.RepromptConfig`` (fields and defaults)."""

    reprompt_template: str = _reprompt_default("reprompt_template")
    solution_template: str = _reprompt_default("solution_template")
    feedback_template: str = _reprompt_default("feedback_template")
    include_environment_feedback: bool = _reprompt_default("include_environment_feedback")
    feedback_only_without_solution: bool = _reprompt_default("feedback_only_without_solution")
    dont_reprompt_on_self_success: bool = _reprompt_default("dont_reprompt_on_self_success")
    strip_thinking: bool = _reprompt_default("strip_thinking")
    success_threshold: float = _reprompt_default("success_threshold")

    def to_reprompt_config(self) -> RepromptConfig:
        return RepromptConfig(**dataclasses.asdict(self))


@dataclass
class TeacherConfig:
    backend: str = "vllm"  # vllm | hf
    context: str = "reprompt"  # reprompt (feedback / successful sibling) | reference_solution (OPSD)
    topk: int = 20
    num_cpus: float = 0.25
    kv_cache_memory_bytes: int = 64 * 2**20
    num_gpus: float = 0.0
    # teacher context + response beyond this many tokens is not scored (no signal, counted);
    # None: the model's max_position_embeddings
    max_context_tokens: Optional[int] = None
    # the teacher's weights: current (synced each step) | ema (moving average, SDPO) | fixed (OPSD)
    update: str = "current"
    ema_rate: float = 0.05  # with update=ema: θ_T ← (1 − rate)·θ_T + rate·θ after each step
    reprompt: RepromptSchema = field(default_factory=RepromptSchema)


@dataclass
class ReplayConfig:
    capacity: int = 4096  # samples held at most
    max_staleness: int = 0  # 0: strictly on-policy


@dataclass
class LearnerConfig:
    world_size: int = 2
    num_cpus: float = 0.5
    num_gpus: float = 0.0  # per rank; 1 for NCCL training
    backend: str = "gloo"  # gloo | nccl
    dtype: str = "float32"  # float32 | bfloat16
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    logprob_chunk_size: int = 256
    # optimizer steps per generation batch, each on its own share of the prompt groups (SDPO's
    # LiveCodeBench runs take 32); the later ones are slightly off-policy and IS-corrected
    updates_per_batch: int = 1


@dataclass
class TrainerConfig:
    total_steps: int = 40
    prompts_per_step: int = 8
    eval_every: int = 10  # 0: never during training
    eval_at_start: bool = True
    checkpoint_every: int = 0  # 0: only at the end
    resume: str = "never"  # never | auto | <checkpoint directory>
    save_hf_at_end: bool = False


@dataclass
class EvalConfig:
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_prompts: Optional[int] = None  # None: the whole validation split
    max_new_tokens: Optional[int] = None  # None: rollout.max_new_tokens
    keep_best: bool = True  # track the best val/accuracy and its step (logged as val/best_*)
    save_best: bool = False  # also save the best policy as a HF model in RUN_DIR/best_model


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "distil_ray"
    wandb_mode: str = "offline"  # offline | online | disabled
    console_every: int = 1


@dataclass
class RunConfig:
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Choice fields: dotted key -> allowed values.
CHOICES: Dict[str, tuple] = {
    "model.dtype": ("float32", "bfloat16"),
    "rollout.engine": ("vllm", "hf"),
    "teacher.backend": ("vllm", "hf"),
    "teacher.context": ("reprompt", "reference_solution"),
    "teacher.update": ("current", "ema", "fixed"),
    "learner.backend": ("gloo", "nccl"),
    "learner.dtype": ("float32", "bfloat16"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}
RESUME_MODES = ("never", "auto")

# Loss arguments the learner supplies per batch; a config that set them would be overwritten.
LOSS_RUNTIME_ARGS = frozenset({"group_ids", "behaviour_logprobs", "old_logprobs", "entropy", "denominator"})


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (``conf/config.yaml`` lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


# --------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A configuration key or value that cannot run; the message names the dotted key."""


def _fmt_allowed(values: Sequence) -> str:
    return ", ".join(repr(v) for v in values)


def _schema_keys(path: Sequence[str]) -> Optional[List[str]]:
    """Field names of the schema node at ``path`` (None where the schema is a free-form dict)."""
    node: Any = RunConfig
    for part in path:
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        default = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        node = default() if default is not None else None
        node = type(node) if dataclasses.is_dataclass(node) else None
    if isinstance(node, type) and dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return None


def _unknown_key_message(full_key: str, present: Optional[Sequence[str]] = None) -> str:
    parent = full_key.rpartition(".")[0]
    allowed = _schema_keys(parent.split(".") if parent else [])
    where = f"under '{parent}'" if parent else "at the top level"
    if allowed is not None:
        return f"{full_key}: unknown key; allowed keys {where} are {', '.join(allowed)}"
    hint = f"; keys present {where}: {', '.join(present)}" if present else ""
    return f"{full_key}: unknown key{hint} (add a new one with +{full_key}=VALUE)"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def config_error_from_exception(exc: BaseException) -> Optional[ConfigError]:
    """Turn a Hydra / OmegaConf composition error into a one-line :class:`ConfigError`
    naming the full key; ``None`` for an exception that is not about the configuration."""
    from hydra.errors import (
        HydraException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        OmegaConfBaseException,
    )

    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, MissingConfigException):
        group = exc.missing_cfg_file or ""
        options = exc.options
        if options is not None and "/" in group:
            grp, _, name = group.rpartition("/")
            return ConfigError(f"{grp}={name}: no such config; allowed values are {_fmt_allowed(sorted(options))}")
        return ConfigError(_one_line(exc))
    if isinstance(exc, OverrideParseException):
        return ConfigError(f"{exc.override}: {_one_line(exc)}" if getattr(exc, "override", None) else _one_line(exc))
    # Hydra wraps the OmegaConf error that names the key; the innermost one is the informative one.
    omega = exc if isinstance(exc, OmegaConfBaseException) else None
    cause = exc.__cause__ or exc.__context__
    depth = 0
    while omega is None and cause is not None and depth < 8:
        if isinstance(cause, OmegaConfBaseException):
            omega = cause
        cause = cause.__cause__ or cause.__context__
        depth += 1
    if omega is not None:
        full_key = getattr(omega, "full_key", None) or ""
        msg = getattr(omega, "msg", None) or str(omega)
        msg = _one_line(msg.split("\n    full_key:")[0])
        if isinstance(omega, (ConfigKeyError, ConfigAttributeError)) and full_key:
            parent = getattr(omega, "parent_node", None)
            present = None
            try:
                present = [str(k) for k in parent] if parent is not None else None
            except Exception:
                present = None
            if "not in struct" in msg or "not in" in msg or "Missing key" in msg:
                return ConfigError(_unknown_key_message(full_key, present))
        return ConfigError(f"{full_key}: {msg}" if full_key else msg)
    if isinstance(exc, HydraException):
        return ConfigError(_one_line(exc))
    return None


# --------------------------------------------------------------------------- validation


class _Checker:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def get(self, key: str):
        node: Any = self.cfg
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def choice(self, key: str, allowed: Sequence) -> None:
        value = self.get(key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: allowed values are {_fmt_allowed(allowed)}")

    def at_least(self, key: str, low, *, optional: bool = False) -> None:
        value = self.get(key)
        if value is None and optional:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= low:
            raise ConfigError(f"{key}={value!r}: must be >= {low}" + (" (or null)" if optional else ""))

    def positive(self, key: str, *, optional: bool = False) -> None:
        value = self.get(key)
        if value is None and optional:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{key}={value!r}: must be > 0" + (" (or null)" if optional else ""))

    def probability(self, key: str) -> None:
        value = self.get(key)
        if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ConfigError(f"{key}={value!r}: must lie in (0, 1]")


def _loss_parameters(loss_fn) -> Dict[str, inspect.Parameter]:
    """Keyword parameters a config may set for ``loss_fn``; a ``**kwargs`` wrapper (``ce_loss``)
    forwards to ``distil_loss``, whose parameters it then accepts."""
    from distil_ray.algorithms import losses

    params = inspect.signature(loss_fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        params = inspect.signature(losses.distil_loss).parameters
    return {
        name: p
        for name, p in params.items()
        if p.kind is p.KEYWORD_ONLY and name not in LOSS_RUNTIME_ARGS
    }


def _dry_run_loss(algorithm, loss_kwargs: Dict[str, Any]) -> None:
    """Call the loss once on a tiny random batch so that a bad value (``baseline='x'``,
    ``loss_agg='sum'``, ``gamma=2``) fails now, with the loss function's own message."""
    import torch

    from distil_ray.algorithms.advantages import group_relative_advantages

    gen = torch.Generator().manual_seed(0)
    B, T, K = 2, 3, 2
    logp = torch.log_softmax(torch.randn(B, T, K + 2, generator=gen, dtype=torch.float64), -1)
    mask = torch.ones(B, T)
    group_ids = torch.tensor([0, 0])
    params = inspect.signature(algorithm.loss_fn).parameters
    accepts = lambda name: name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if algorithm.needs_teacher:
        teacher = torch.log_softmax(torch.randn(B, T, K + 2, generator=gen, dtype=torch.float64), -1)[..., :K]
        args = (logp[..., 0], logp[..., :K], teacher, mask)
        extra = {"group_ids": group_ids} if accepts("group_ids") else {}
        if accepts("behaviour_logprobs"):
            # exercises is_clip too
            extra["behaviour_logprobs"] = logp[..., 1]
    elif algorithm.needs_advantages:
        args, extra = (logp[..., 0], mask, group_relative_advantages(torch.tensor([1.0, 0.0]), group_ids)), {}
        if accepts("old_logprobs"):
            extra["old_logprobs"] = logp[..., 1]
    else:
        args, extra = (logp[..., 0], mask), {}
    loss, _ = algorithm.loss_fn(*args, **loss_kwargs, **extra)
    if not torch.isfinite(loss):
        raise ValueError(f"the loss is not finite on a test batch with {loss_kwargs}")


def _loss_value_message(algorithm, loss_kwargs: Dict[str, Any], error: Exception) -> str:
    """Name the key behind a loss's ValueError. The loss may word it after an inner argument
    (opsd's ``beta`` is ``alpha`` of the JSD), so the culprit is the key whose removal alone
    makes the test batch pass."""
    msg = _one_line(error)
    head = msg.split("=", 1)[0]
    if head in loss_kwargs:
        return f"algorithm.loss.{msg}"
    for key in loss_kwargs:
        rest = {k: v for k, v in loss_kwargs.items() if k != key}
        try:
            _dry_run_loss(algorithm, rest)
        except (ValueError, TypeError):
            continue
        return f"algorithm.loss.{key}={loss_kwargs[key]!r}: rejected by {algorithm.loss_fn.__name__} ({msg})"
    return f"algorithm.loss: rejected by {algorithm.loss_fn.__name__} with {loss_kwargs} ({msg})"


def _check_algorithm(c: _Checker) -> None:
    from distil_ray.algorithms import ALGORITHMS
    from distil_ray.algorithms.advantages import group_relative_advantages

    cfg = c.cfg
    c.choice("algorithm.name", tuple(ALGORITHMS))
    algorithm = ALGORITHMS[cfg.algorithm.name]
    loss_kwargs = dict(cfg.algorithm.loss)
    allowed = _loss_parameters(algorithm.loss_fn)
    for key in loss_kwargs:
        if key not in allowed:
            raise ConfigError(
                f"algorithm.loss.{key}: unknown key for algorithm {cfg.algorithm.name!r}; "
                f"allowed keys are {', '.join(allowed)}"
            )
    if algorithm.loss_fn.__name__ == "ce_loss" and "future_credit_coef" in loss_kwargs:
        raise ConfigError("algorithm.loss.future_credit_coef: 'ce' is DistIL without future credit; use algorithm=distil")
    try:
        _dry_run_loss(algorithm, loss_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(_loss_value_message(algorithm, loss_kwargs, e)) from None

    adv_params = {
        n for n, p in inspect.signature(group_relative_advantages).parameters.items() if p.kind is p.KEYWORD_ONLY
    }
    for key in cfg.algorithm.advantages:
        if key not in adv_params:
            raise ConfigError(f"algorithm.advantages.{key}: unknown key; allowed keys are {', '.join(sorted(adv_params))}")
    if cfg.algorithm.advantages and not algorithm.needs_advantages:
        raise ConfigError(
            f"algorithm.advantages: algorithm {cfg.algorithm.name!r} uses no advantages; remove the section"
        )
    if algorithm.needs_advantages and cfg.rollout.n_samples < 2:
        raise ConfigError(
            f"rollout.n_samples={cfg.rollout.n_samples}: algorithm {cfg.algorithm.name!r} needs >= 2 "
            "(group-relative advantages of a single rollout are 0)"
        )


def _check_task(c: _Checker) -> None:
    from distil_ray.tasks import TASKS, _resolve

    cfg = c.cfg
    c.choice("task.name", sorted(TASKS))
    # The factory is resolved (imported), never called: constructing a task may load data.
    factory = _resolve(cfg.task.name, TASKS[cfg.task.name])
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"]
    for key in cfg.task.kwargs:
        if key not in allowed:
            raise ConfigError(
                f"task.kwargs.{key}: unknown key for task {cfg.task.name!r}; allowed keys are {', '.join(allowed)}"
            )
    for key in ("task.train_split", "task.val_split"):
        if not isinstance(c.get(key), str) or not c.get(key):
            raise ConfigError(f"{key}={c.get(key)!r}: must be a non-empty split name")


def _check_model(c: _Checker) -> None:
    cfg = c.cfg
    c.choice("model.dtype", CHOICES["model.dtype"])
    if cfg.model.path is not None:
        return
    from distil_ray.models.tiny import TinyModelConfig

    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
        c.at_least(f"model.tiny.{name}", 1)
    try:
        # TinyModelConfig checks what vLLM and the tokenizer need (head_dim, vocab size, GQA ratio).
        TinyModelConfig(**dataclasses.asdict(cfg.model.tiny))
    except ValueError as e:
        raise ConfigError(f"model.tiny.{_one_line(e)}") from None
    if cfg.teacher.topk > cfg.model.tiny.vocab_size:
        raise ConfigError(f"teacher.topk={cfg.teacher.topk}: must be <= model.tiny.vocab_size={cfg.model.tiny.vocab_size}")


def _check_reprompt(c: _Checker) -> None:
    r = c.cfg.teacher.reprompt
    # The templates are str.format()-ed with these names (distil_ray.feedback.templates.reprompt_group).
    templates = {
        "reprompt_template": {"prompt": "p", "solution": "s", "feedback": "f"},
        "solution_template": {"successful_previous_attempt": "a"},
        "feedback_template": {"feedback_raw": "f"},
    }
    for name, fields in templates.items():
        try:
            getattr(r, name).format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"teacher.reprompt.{name}: cannot be formatted ({type(e).__name__}: {e}); "
                f"allowed placeholders are {', '.join('{' + f + '}' for f in fields)}"
            ) from None


def _check_resume(c: _Checker) -> None:
    resume = c.cfg.trainer.resume
    if resume in RESUME_MODES:
        return
    if not isinstance(resume, str) or not resume or not Path(resume).expanduser().is_dir():
        raise ConfigError(
            f"trainer.resume={resume!r}: allowed values are 'never', 'auto' or an existing checkpoint directory"
        )


def check_cpu_budget(cfg: "RunConfig", available: float, where: str) -> None:
    """Fail unless the actors' CPU shares fit in ``available`` CPUs (``where`` names the limit).

    Ray would otherwise queue the actors that do not fit and the run would wait forever. The shares
    are scheduling tokens, not threads.
    """
    from distil_ray.algorithms import ALGORITHMS

    demand = {
        "rollout.num_cpus * rollout.num_workers": cfg.rollout.num_cpus * cfg.rollout.num_workers,
        "feedback.num_cpus * feedback.num_workers": cfg.feedback.num_cpus * cfg.feedback.num_workers,
        "learner.num_cpus * learner.world_size": cfg.learner.num_cpus * cfg.learner.world_size,
    }
    if ALGORITHMS[cfg.algorithm.name].needs_teacher:
        demand["teacher.num_cpus"] = cfg.teacher.num_cpus
    total = sum(demand.values())
    if total > available + 1e-9:
        parts = ", ".join(f"{k} = {v:g}" for k, v in demand.items())
        raise ConfigError(
            f"{where}: the actors ask for {total:g} CPUs ({parts}); lower those shares or add CPUs"
        )


def validate(cfg) -> RunConfig:
    """Check every key and value that a type cannot; return the config as a :class:`RunConfig`.

    Accepts a ``RunConfig``, an OmegaConf ``DictConfig`` or a plain dict (merged onto the schema,
    so unknown keys fail here too). Raises :class:`ConfigError` on the first problem found.
    """
    cfg = to_run_config(cfg)
    c = _Checker(cfg)
    for key, allowed in CHOICES.items():
        c.choice(key, allowed)

    if cfg.ray.num_cpus is not None:
        c.positive("ray.num_cpus")
    if not cfg.ray.namespace:
        raise ConfigError("ray.namespace='': must be a non-empty name")
    _check_model(c)
    if cfg.warm_start.enabled:
        c.at_least("warm_start.steps", 1)
        c.at_least("warm_start.batch_size", 1)
        c.positive("warm_start.lr")

    _check_task(c)
    _check_algorithm(c)

    c.at_least("rollout.num_workers", 1)
    c.positive("rollout.num_cpus")
    c.at_least("rollout.n_samples", 1)
    c.at_least("rollout.temperature", 0.0)
    c.probability("rollout.top_p")
    c.at_least("rollout.max_new_tokens", 1)
    c.positive("rollout.kv_cache_memory_bytes")
    c.at_least("rollout.max_num_seqs", 1)

    c.at_least("feedback.num_workers", 1)
    c.positive("feedback.num_cpus")

    c.at_least("teacher.topk", 1)
    c.positive("teacher.num_cpus")
    c.positive("teacher.kv_cache_memory_bytes")
    _check_reprompt(c)

    c.at_least("replay.max_staleness", 0)
    c.at_least("replay.capacity", 1)
    per_step = cfg.trainer.prompts_per_step * cfg.rollout.n_samples
    if cfg.replay.capacity < per_step:
        raise ConfigError(
            f"replay.capacity={cfg.replay.capacity}: must be >= trainer.prompts_per_step * rollout.n_samples "
            f"= {per_step} (one step's samples)"
        )

    c.at_least("learner.world_size", 1)
    c.positive("learner.num_cpus")
    c.positive("learner.lr")
    c.at_least("learner.weight_decay", 0.0)
    betas = list(cfg.learner.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"learner.betas={betas!r}: must be two numbers in [0, 1)")
    c.at_least("learner.warmup_steps", 0)
    c.positive("learner.grad_clip")
    c.at_least("learner.micro_batch_size", 1)
    c.at_least("learner.updates_per_batch", 1)
    c.at_least("learner.logprob_chunk_size", 1)
    for key in ("rollout.num_gpus", "teacher.num_gpus", "learner.num_gpus"):
        c.at_least(key, 0.0)
    if cfg.learner.backend == "nccl" and cfg.learner.num_gpus < 1:
        raise ConfigError("learner.backend='nccl' needs learner.num_gpus >= 1 (one GPU per rank)")
    c.probability("teacher.ema_rate")
    if cfg.task.max_prompt_tokens is not None:
        c.at_least("task.max_prompt_tokens", 1)
    if cfg.teacher.max_context_tokens is not None:
        c.at_least("teacher.max_context_tokens", 2)
    if cfg.ray.num_cpus is not None and cfg.ray.address is None:
        check_cpu_budget(cfg, cfg.ray.num_cpus, f"ray.num_cpus={cfg.ray.num_cpus}")

    c.at_least("trainer.total_steps", 1)
    c.at_least("trainer.prompts_per_step", 1)
    if cfg.learner.updates_per_batch > cfg.trainer.prompts_per_step:
        raise ConfigError(
            f"learner.updates_per_batch={cfg.learner.updates_per_batch}: at most trainer.prompts_per_step="
            f"{cfg.trainer.prompts_per_step} (each update needs at least one prompt's group)"
        )
    c.at_least("trainer.eval_every", 0)
    c.at_least("trainer.checkpoint_every", 0)
    _check_resume(c)

    c.at_least("eval.n_samples", 1)
    c.at_least("eval.temperature", 0.0)
    c.probability("eval.top_p")
    c.at_least("eval.max_prompts", 1, optional=True)
    c.at_least("eval.max_new_tokens", 1, optional=True)

    c.at_least("logging.console_every", 1)
    for key in ("rollout.temperature", "eval.temperature", "learner.lr"):
        if isinstance(c.get(key), float) and not math.isfinite(c.get(key)):
            raise ConfigError(f"{key}={c.get(key)!r}: must be finite")
    return cfg


# --------------------------------------------------------------------------- conversion and composition


def to_run_config(cfg) -> RunConfig:
    """A :class:`RunConfig` from a ``RunConfig``, ``DictConfig`` or dict (unknown keys → ConfigError)."""
    if isinstance(cfg, RunConfig):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        # A key added with Hydra's `+` lands in a typed node without complaint, and to_object
        # would then drop it silently: check every key against the schema first.
        _check_keys(OmegaConf.to_container(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg, resolve=False), RunConfig, "")
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise config_error_from_exception(e) from None
    assert isinstance(obj, RunConfig)
    return obj


def _check_keys(values, schema, prefix: str) -> None:
    if not isinstance(values, dict):
        return
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in values.items():
        full_key = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(_unknown_key_message(full_key))
        sub = hints.get(key)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            _check_keys(value, sub, f"{full_key}.")


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """Plain nested dict of a config (for JSON, wandb, Ray actor options)."""
    return dataclasses.asdict(cfg)


def config_dir() -> Path:
    """The Hydra tree: ``$DISTIL_RAY_CONF`` if set, else ``conf/`` beside the package."""
    env = os.environ.get("DISTIL_RAY_CONF")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str] = (), *, conf_dir: Optional[str | Path] = None) -> RunConfig:
    """Compose ``config.yaml`` with Hydra ``overrides`` and validate it (no Ray, no run dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    directory = str(Path(conf_dir).resolve() if conf_dir is not None else config_dir())
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=directory, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as e:
        err = config_error_from_exception(e)
        if err is None:
            raise
        raise err from None
    return validate(cfg)


__all__ = [
    "CHOICES",
    "AlgorithmConfig",
    "ConfigError",
    "EvalConfig",
    "FeedbackConfig",
    "LearnerConfig",
    "LoggingConfig",
    "ModelConfig",
    "RayConfig",
    "ReplayConfig",
    "RepromptSchema",
    "RolloutConfig",
    "RunConfig",
    "TaskConfig",
    "TeacherConfig",
    "TinyConfig",
    "TrainerConfig",
    "WarmStartConfig",
    "compose_config",
    "config_dir",
    "config_error_from_exception",
    "register_configs",
    "to_dict",
    "to_run_config",
    "validate",
]
