"""A one-process DistIL demo on a tiny local model: the algorithm's loop, end to end, in ~a minute.

    python -m distil_ray.demo [--steps 12] [--algorithm distil|ce]

Each step: the student samples answers to small addition questions (HF ``generate``), a checker
grades them and writes feedback ("you answered 9, the answer is 7"), the teacher — the same weights
with that feedback in its context (SDPO's reprompt template) — scores the student's own response
tokens (top-k log-probs), and the learner takes one AdamW step on the DistIL loss computed with the
chunked log-prob gathering. The model is randomly initialised, so this shows the mechanics (the
student's divergence from its feedback-conditioned teacher shrinks), not task learning; the Ray
pipeline with a warm-started model is ``python -m distil_ray.main +experiment=tiny``.
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch

from distil_ray.algorithms import get_algorithm
from distil_ray.feedback.templates import reprompt_group
from distil_ray.learner.forward import response_logprobs
from distil_ray.models import load_tiny, tiny_model_dir
from distil_ray.engines.hf import score_topk


def make_questions(n: int, rng: random.Random):
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append(([{"role": "user", "content": f"What is {a}+{b}? Answer with a number."}], a + b))
    return out


def grade(response: str, answer: int):
    numbers = re.findall(r"-?\d+", response)
    if numbers and int(numbers[-1]) == answer:
        return 1.0, None
    said = f"you answered {numbers[-1]}" if numbers else "your answer had no number"
    return 0.0, f"Incorrect: {said}; the correct answer is {answer}."


def pad_left(seqs, pad_id):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--algorithm", default="distil", choices=["distil", "ce"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = load_tiny(tiny_model_dir())
    algorithm = get_algorithm(args.algorithm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    questions = make_questions(args.prompts, rng)  # fixed prompts: the divergence curve is comparable
    print(f"{'step':>4} {'reward':>7} {'loss':>8} {'CE':>7} {'KL':>7} {'|credit|':>9} {'tok/s':>7}")
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        # 1. rollouts: n samples per prompt, token ids in and out
        prompt_ids = [tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m, _ in questions]
        batch_prompts = [p for p in prompt_ids for _ in range(args.samples)]
        ids, mask = pad_left(batch_prompts, tok.pad_token_id)
        model.eval()
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
            )[:, ids.shape[1] :]
        responses = []
        for row in generated.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in (tok.eos_token_id, tok.pad_token_id)), len(row))
            responses.append(row[:cut])
        texts = tok.batch_decode(responses, skip_special_tokens=True)

        # 2. feedback and teacher contexts (siblings' successes or the checker's message)
        teacher_prompts, rewards, has_signal = [], [], []
        for q, (messages, answer) in enumerate(questions):
            group = range(q * args.samples, (q + 1) * args.samples)
            graded = [grade(texts[i], answer) for i in group]
            rewards += [r for r, _ in graded]
            for ctx, i in zip(reprompt_group(messages, [texts[i] for i in group], [r for r, _ in graded], [f for _, f in graded]), group):
                has_signal.append(ctx.has_signal)
                teacher_prompts.append(tok.apply_chat_template(ctx.messages or messages, add_generation_prompt=True, return_dict=False))

        # 3. teacher: the current policy (stop-gradient) with feedback in context, on the student's tokens
        scores = score_topk(model, teacher_prompts, responses, k=args.topk)

        # 4. learner: student log-probs at the sampled tokens and the teacher's top-k, DistIL loss, step
        full = [p + r for p, r in zip(batch_prompts, responses)]
        ids, attn = pad_left(full, tok.pad_token_id)
        L, K = ids.shape[1], args.topk
        response_mask = torch.zeros_like(ids)
        topk_ids = torch.zeros(len(full), L, K, dtype=torch.long)
        teacher_lp = torch.zeros(len(full), L, K)
        for i, (r, s) in enumerate(zip(responses, scores)):
            response_mask[i, L - len(r) :] = int(has_signal[i])
            topk_ids[i, L - len(r) :] = s.topk_ids
            teacher_lp[i, L - len(r) :] = s.topk_logprobs
        model.train()
        out = response_logprobs(model, ids, attn, response_mask, topk_ids)
        group_ids = torch.arange(len(full)) // args.samples
        loss, metrics = algorithm.loss_fn(
            out.token_logprobs, out.topk_logprobs, teacher_lp, response_mask, group_ids=group_ids,
            baseline="group" if args.algorithm == "distil" else "none",
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        n_tokens = sum(map(len, responses))
        print(
            f"{step:>4} {sum(rewards) / len(rewards):>7.2f} {float(loss.detach()):>8.3f} {metrics['distil/ce']:>7.3f} "
            f"{metrics['distil/kl']:>7.3f} {metrics.get('distil/future_credit_abs', 0.0):>9.3f} "
            f"{n_tokens / (time.perf_counter() - t0):>7.0f}"
        )


if __name__ == "__main__":
    main()
