"""Hand-made ``Scored`` batches for the learner tests, and a plain single-process reference step.

The records are real: prompts from the chat template, responses drawn from the tiny model's
vocabulary, behaviour log-probs from the model itself (slightly perturbed, as a stale sampler's
would be), and the teacher is the same model scored with ``score_topk`` on a different context
(the prompt plus a feedback turn).
"""

from __future__ import annotations

import numpy as np
import torch

from distil_ray.algorithms import get_algorithm
from distil_ray.algorithms.advantages import group_relative_advantages
from distil_ray.learner.forward import response_logprobs
from distil_ray.learner.packing import pack
from distil_ray.records import Graded, Rollout, Scored
from distil_ray.engines.hf import score_topk


def make_records(model, tokenizer, *, n_prompts=4, samples=4, k=8, seed=0, min_len=3, max_len=12,
                 no_signal=(1,)):
    """``n_prompts × samples`` records; records whose index is in ``no_signal`` get distill_mask=False."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    prompts, teacher_prompts, responses, uids = [], [], [], []
    for p in range(n_prompts):
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        messages = [{"role": "user", "content": f"What is {a}+{b}?" + " Think." * p}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        feedback = messages + [{"role": "assistant", "content": "I think so."},
                               {"role": "user", "content": f"Wrong. The answer is {a + b}."}]
        t_ids = tokenizer.apply_chat_template(feedback, add_generation_prompt=True, return_dict=False)
        for _ in range(samples):
            prompts.append(ids)
            teacher_prompts.append(t_ids)
            responses.append(rng.integers(3, vocab, int(rng.integers(min_len, max_len + 1))).tolist())
            uids.append(f"p{p}")
    with torch.no_grad():
        teacher = score_topk(model.eval(), teacher_prompts, responses, k)
        behaviour = score_topk(model, prompts, responses, 1)
    records = []
    for i, (prompt, resp, uid) in enumerate(zip(prompts, responses, uids)):
        noise = rng.normal(0.0, 0.05, len(resp)).astype(np.float32)
        rollout = Rollout(
            prompt_uid=uid, sample_index=i % samples, response_ids=np.asarray(resp, np.int32),
            behaviour_logprobs=behaviour[i].token_logprobs.numpy().astype(np.float32) + noise,
            finish_reason="stop", policy_version=0, text="", prompt_ids=np.asarray(prompt, np.int32),
        )
        reward = float(rng.integers(0, 2))
        graded = Graded.from_rollout(rollout, reward=reward, correct=reward > 0, score=reward)
        records.append(Scored.from_graded(
            graded,
            teacher_topk_ids=teacher[i].topk_ids.numpy().astype(np.int32),
            teacher_topk_logprobs=teacher[i].topk_logprobs.numpy().astype(np.float32),
            teacher_token_logprobs=teacher[i].token_logprobs.numpy().astype(np.float32),
            distill_mask=i not in no_signal,
            teacher_prompt_ids=np.asarray(teacher_prompts[i], np.int32),
        ))
    return records


def reference_step(model, records, *, algorithm, loss_kwargs, advantage_kwargs=None, lr, eps, betas=(0.9, 0.999),
                   weight_decay=0.0, grad_clip=1.0, pad_id, topk=None):
    """One AdamW step of a plain (unsharded) model on ONE loss over the whole batch.

    Returns (loss, grad_norm). Written independently of the learner's micro-batching: no global
    denominators, no filtering beyond the algorithm's own definition (SFT trains on successes).
    """
    algo = get_algorithm(algorithm)
    if algo.train_on == "successful":
        records = [r for r in records if r.correct]
    if algo.needs_teacher and topk is None:
        topk = min(r.teacher_topk_ids.shape[1] for r in records)
    batch = pack(records, pad_id=pad_id, topk=topk if algo.needs_teacher else None, distill_only=algo.needs_teacher)
    model.train()
    out = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask, batch.topk_ids)
    mask = batch.response_mask
    if algo.needs_teacher:
        extra = {"entropy": out.entropy}
        if algorithm in ("distil", "ce"):
            extra["group_ids"] = batch.group_ids
        if algorithm in ("distil", "ce", "sdpo"):
            extra["behaviour_logprobs"] = batch.behaviour_logprobs
        loss, _ = algo.loss_fn(out.token_logprobs, out.topk_logprobs, batch.teacher_topk_logprobs, mask,
                               **loss_kwargs, **extra)
    elif algo.needs_advantages:
        adv = group_relative_advantages(batch.rewards, batch.group_ids, **(advantage_kwargs or {}))
        loss, _ = algo.loss_fn(out.token_logprobs, mask, adv, old_logprobs=batch.behaviour_logprobs, **loss_kwargs)
    else:
        loss, _ = algo.loss_fn(out.token_logprobs, mask, **loss_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, betas=betas, weight_decay=weight_decay)
    opt.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach()), float(norm)
