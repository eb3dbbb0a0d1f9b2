"""A short supervised warm start, so a tiny random model starts RL the way a pretrained LLM does.

A pretrained LLM arrives at RL knowing the answer format, some of the task, and how to use
feedback written into its context. A randomly initialised tiny model knows none of it, so neither
its rewards nor its feedback-conditioned teacher carry any signal. ``warm_start_dir`` fine-tunes
the tiny base model on the task's own warm-start examples (``task.warm_start_examples(n, rng)``:
``(messages, target_text)`` pairs, teacher contexts included) and caches the result like
``tiny_model_dir``: keyed by the base model, the task's configuration and the warm-start
configuration, built in a temp dir and renamed into place.

``evaluate_student_and_teacher`` measures what the warm start bought: greedy accuracy of the
student on held-out prompts, and of the self-teacher — the same weights, given the teacher context
that ``reprompt_group`` builds from the feedback on the student's own attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distil_ray.feedback.templates import RepromptConfig, reprompt_group
from distil_ray.models.config import WarmStartConfig
from distil_ray.models.tiny import cached_build, default_cache_root, load_tiny

__all__ = [
    "WarmStartConfig",
    "evaluate_student_and_teacher",
    "evaluate_with_model",
    "greedy_responses",
    "train_warm_start",
    "warm_start_dir",
]

# Bump when the training recipe changes in a way the config does not show (loss, schedule,
# example format): it is part of the cache key, so a stale warm start is never reused.
_WARM_START_VERSION = 1


def _task_config(task) -> dict[str, Any]:
    config = getattr(task, "config", None)
    if not callable(config) or not hasattr(task, "warm_start_examples"):
        raise TypeError(
            f"task {getattr(task, 'name', task)!r} cannot be warm-started: it needs a config() method "
            "(what the cache is keyed by) and warm_start_examples(n, rng)"
        )
    return config()


def cache_key(base_model_dir: str | os.PathLike, task, cfg: WarmStartConfig) -> str:
    payload = json.dumps(
        {
            "version": _WARM_START_VERSION,
            "base": Path(base_model_dir).name,
            "task": _task_config(task),
            "warm_start": dataclasses.asdict(cfg),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def warm_start_dir(
    base_model_dir: str | os.PathLike,
    task,
    cfg: WarmStartConfig,
    cache_root: str | os.PathLike | None = None,
    log_every: int = 0,
) -> Path:
    """The warm-started model for ``(base model, task, cfg)``, trained only if not cached.

    ``cfg.enabled=False`` returns ``base_model_dir`` itself. The build goes into a private temp dir
    that is renamed into place (atomic), so concurrent callers never see a half-written model; the
    loser of a race discards its copy (training is deterministic: the copies are the same).
    """
    base = Path(base_model_dir)
    if not cfg.enabled:
        return base
    cfg.check()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / "warm_start" / f"{base.name}-{task.name}-{cache_key(base, task, cfg)}"

    def build(tmp: Path) -> None:
        model, tok = load_tiny(base)
        t0 = time.perf_counter()
        stats = train_warm_start(model, tok, task, cfg, log_every)
        stats["seconds"] = time.perf_counter() - t0
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "warm_start.json").write_text(
            json.dumps(
                {"base": str(base), "task": _task_config(task), "warm_start": dataclasses.asdict(cfg), "stats": stats},
                indent=2,
                sort_keys=True,
                default=str,
            )
        )

    return cached_build(final, build)


# ----------------------------------------------------------------------------------------------
# training


def _encode_examples(
    tok, examples: Sequence[tuple[list[dict], str]]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + eos): the prompt exactly as generation sees it (chat template with
    the generation prompt), the target tokenised on its own, as generation emits it."""
    out = []
    for messages, target in examples:
        prompt = tok.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False
        )
        answer = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
        out.append((list(prompt), answer))
    return out


def _sft_batch(pairs, pad_id: int):
    """Right-padded ids, attention mask and labels (-100 everywhere but the target tokens)."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(pairs):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(a)
    return ids, mask, labels


def train_warm_start(
    model, tok, task, cfg: WarmStartConfig, log_every: int = 0
) -> dict[str, float]:
    """SFT of ``model`` in place on ``cfg.steps × cfg.batch_size`` fresh task examples (loss on the
    target tokens only), AdamW with a short linear warm-up and a cosine decay to a tenth.
    ``log_every > 0`` prints the running loss every that many steps."""
    rng = random.Random(cfg.seed)
    warmup = max(1, cfg.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    # fork_rng: nothing here may move the caller's global torch stream (a cache hit and a miss
    # must leave an experiment in the same state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
        model.train()
        losses = []
        for _ in range(cfg.steps):
            examples = task.warm_start_examples(
                cfg.batch_size, rng, context_fraction=cfg.context_fraction
            )
            ids, mask, labels = _sft_batch(
                _encode_examples(tok, examples), tok.pad_token_id
            )
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if log_every and len(losses) % log_every == 0:
                recent = losses[-log_every:]
                print(
                    f"warm start step {len(losses)}/{cfg.steps}: loss {sum(recent) / len(recent):.4f}",
                    flush=True,
                )
        model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "steps": cfg.steps,
    }


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def greedy_responses(
    model,
    tok,
    messages_list: Sequence[list[dict]],
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) for a list of chat prompts."""
    model.eval()
    texts: list[str] = []
    stop = {tok.eos_token_id, tok.pad_token_id}
    for start in range(0, len(messages_list), batch_size):
        prompts = [
            tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False)
            for m in messages_list[start : start + batch_size]
        ]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(
            prompts
        ):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
        )[:, width:]
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            texts.append(tok.decode(row[:cut], skip_special_tokens=True))
    return texts


def evaluate_with_model(
    model,
    tok,
    task,
    examples,
    *,
    teacher: bool = True,
    max_new_tokens: int = 8,
    reprompt: RepromptConfig | None = None,
) -> dict[str, float]:
    """Greedy student accuracy on ``examples``; with ``teacher``, also the self-teacher's: the same
    model given the context ``reprompt_group`` builds from the grade of the student's own greedy
    attempt (its feedback — "Your answer … is correct." included, as in training a lone success
    gets its own feedback, never itself as a demonstration)."""
    reprompt = reprompt or RepromptConfig()
    examples = list(examples)
    student = greedy_responses(
        model, tok, [e.messages for e in examples], max_new_tokens
    )
    grades = [task.grade(e, r) for e, r in zip(examples, student)]
    result: dict[str, float] = {
        "n_prompts": float(len(examples)),
        "student_accuracy": sum(g.correct for g in grades) / max(1, len(examples)),
        "student_score": sum(g.score for g in grades) / max(1, len(examples)),
    }
    if not teacher:
        return result
    contexts = [
        reprompt_group(e.messages, [r], [g.reward], [g.feedback], reprompt)[0].messages
        or e.messages
        for e, r, g in zip(examples, student, grades)
    ]
    teacher_texts = greedy_responses(model, tok, contexts, max_new_tokens)
    t_correct = [task.grade(e, r).correct for e, r in zip(examples, teacher_texts)]
    failures = [i for i, g in enumerate(grades) if not g.correct]
    result["teacher_accuracy"] = sum(t_correct) / max(1, len(examples))
    result["n_failures"] = float(len(failures))
    # the case that matters for learning: the student was wrong and the feedback says where
    result["teacher_accuracy_on_failures"] = sum(t_correct[i] for i in failures) / max(
        1, len(failures)
    )
    return result


def evaluate_student_and_teacher(
    model_dir: str | os.PathLike, task, n_prompts: int = 128, **kwargs
) -> dict[str, float]:
    """Step-0 numbers of a model directory on the first ``n_prompts`` test prompts."""
    model, tok = load_tiny(model_dir)
    return evaluate_with_model(
        model, tok, task, task.load("test")[:n_prompts], **kwargs
    )
