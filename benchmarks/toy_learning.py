"""Does the toy task learn? DistIL against GRPO from the same warm start, in one process (no Ray).

    python benchmarks/toy_learning.py [--algorithms distil grpo] [--steps 40] [--lr 1e-3]

The tiny model is warm-started on the toy task (or the cached warm start is loaded), its step-0
greedy accuracy is measured for the student and for the self-teacher (the same weights given the
feedback on the student's own attempt), then each algorithm trains a fresh copy of the warm model:
every step samples ``--prompts`` training prompts × ``--samples`` answers (HF ``generate``, T=1),
grades them, and takes one AdamW step —

* ``distil``: ``reprompt_group`` builds each sample's teacher context (a successful sibling's
  answer, else the feedback); the teacher — the current weights, no gradient — scores the sample's
  own tokens (top-k log-probs, ``score_topk``); loss = DistIL with the group baseline.
* ``grpo``: clipped policy gradient with group-relative advantages, behaviour log-probs from the
  sampling pass as the old policy.

Greedy accuracy on the held-out test prompts is printed every ``--eval-every`` steps, and the
table at the end compares the algorithms (the baseline is measured in the same run).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil_ray.algorithms import get_algorithm, group_relative_advantages
from distil_ray.feedback.templates import reprompt_group
from distil_ray.learner.forward import response_logprobs
from distil_ray.models import load_tiny, tiny_model_dir
from distil_ray.models.warm_start import (
    WarmStartConfig,
    evaluate_with_model,
    warm_start_dir,
)
from distil_ray.tasks.toy import TOY_MODEL_SHAPE, ToyConfig, ToyTask, toy_model_config
from distil_ray.engines.hf import score_topk


def pad_left(seqs, pad_id):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def sample(model, tok, prompt_ids, max_new_tokens):
    """T=1 samples: response ids (cut after the first stop token, kept) and their behaviour log-probs."""
    ids, mask = pad_left(prompt_ids, tok.pad_token_id)
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    generated = out.sequences[:, ids.shape[1] :]
    logp = torch.stack(
        [torch.log_softmax(s.float(), -1) for s in out.scores], 1
    )  # [B, T, V]
    stop = {tok.eos_token_id, tok.pad_token_id}
    responses, behaviour = [], []
    for b, row in enumerate(generated.tolist()):
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        responses.append(row[:cut])
        behaviour.append(logp[b, torch.arange(cut), generated[b, :cut]])
    return responses, behaviour


def train_step(model, tok, task, algorithm, optimizer, examples, args):
    prompt_ids = [
        tok.apply_chat_template(
            e.messages, add_generation_prompt=True, return_dict=False
        )
        for e in examples
    ]
    batch_prompts = [p for p in prompt_ids for _ in range(args.samples)]
    responses, behaviour = sample(model, tok, batch_prompts, args.max_new_tokens)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    grades = [task.grade(examples[i // args.samples], t) for i, t in enumerate(texts)]
    rewards = torch.tensor([g.reward for g in grades])

    full = [p + r for p, r in zip(batch_prompts, responses)]
    ids, attn = pad_left(full, tok.pad_token_id)
    L, B = ids.shape[1], len(full)
    response_mask = torch.zeros_like(ids)
    for i, r in enumerate(responses):
        response_mask[i, L - len(r) :] = 1
    group_ids = torch.arange(B) // args.samples
    metrics = {"reward": float(rewards.mean())}

    if algorithm.needs_teacher:
        teacher_prompts, has_signal = [], []
        for q, e in enumerate(examples):
            group = range(q * args.samples, (q + 1) * args.samples)
            contexts = reprompt_group(
                e.messages,
                [texts[i] for i in group],
                [grades[i].reward for i in group],
                [grades[i].feedback for i in group],
            )
            for ctx in contexts:
                has_signal.append(ctx.has_signal)
                teacher_prompts.append(
                    tok.apply_chat_template(
                        ctx.messages or e.messages,
                        add_generation_prompt=True,
                        return_dict=False,
                    )
                )
        model.eval()
        scores = score_topk(model, teacher_prompts, responses, k=args.topk)
        K = scores[0].topk_ids.shape[-1]
        topk_ids = torch.zeros(B, L, K, dtype=torch.long)
        teacher_lp = torch.zeros(B, L, K)
        for i, (r, s) in enumerate(zip(responses, scores)):
            topk_ids[i, L - len(r) :] = s.topk_ids
            teacher_lp[i, L - len(r) :] = s.topk_logprobs
            if not has_signal[i]:
                response_mask[i] = 0
        model.train()
        out = response_logprobs(model, ids, attn, response_mask, topk_ids)
        loss, m = algorithm.loss_fn(
            out.token_logprobs,
            out.topk_logprobs,
            teacher_lp,
            response_mask,
            group_ids=group_ids,
            baseline="group",
        )
        metrics["ce"] = m["distil/ce"] if "distil/ce" in m else float("nan")
        metrics["signal"] = sum(has_signal) / B
    else:
        old = torch.zeros(B, L)
        for i, b in enumerate(behaviour):
            old[i, L - len(b) :] = b
        advantages = group_relative_advantages(rewards, group_ids, normalize_std=True)
        model.train()
        out = response_logprobs(model, ids, attn, response_mask)
        loss, m = algorithm.loss_fn(
            out.token_logprobs, response_mask, advantages, old_logprobs=old
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    metrics["loss"] = float(loss.detach())
    return metrics


def run(name, warm_model, tok, task, args, test_examples):
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)  # the same prompt stream for every algorithm
    model = copy.deepcopy(warm_model)
    algorithm = get_algorithm(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train = task.load("train")
    curve = [
        (
            0,
            evaluate_with_model(model, tok, task, test_examples, teacher=False)[
                "student_accuracy"
            ],
        )
    ]
    print(f"[{name}] step 0: val accuracy {curve[0][1]:.3f}", flush=True)
    step_times = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        examples = rng.sample(train, args.prompts)
        metrics = train_step(model, tok, task, algorithm, optimizer, examples, args)
        step_times.append(time.perf_counter() - t0)
        line = f"[{name}] step {step:3d}  reward {metrics['reward']:.3f}  loss {metrics['loss']:+.4f}  {step_times[-1]:.2f}s"
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate_with_model(model, tok, task, test_examples, teacher=False)[
                "student_accuracy"
            ]
            curve.append((step, acc))
            line += f"  val accuracy {acc:.3f}"
        print(line, flush=True)
    return curve, sum(step_times) / len(step_times)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--algorithms",
        nargs="+",
        default=["distil", "grpo"],
        choices=["distil", "ce", "grpo"],
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)  # 5e-4 learns too, a little slower
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    # model shape and warm start
    p.add_argument("--hidden", type=int, default=TOY_MODEL_SHAPE["hidden_size"])
    p.add_argument("--layers", type=int, default=TOY_MODEL_SHAPE["num_layers"])
    p.add_argument("--heads", type=int, default=TOY_MODEL_SHAPE["num_heads"])
    p.add_argument("--kv-heads", type=int, default=TOY_MODEL_SHAPE["num_kv_heads"])
    p.add_argument(
        "--intermediate", type=int, default=TOY_MODEL_SHAPE["intermediate_size"]
    )
    p.add_argument("--ws-steps", type=int, default=WarmStartConfig.steps)
    p.add_argument("--ws-batch", type=int, default=WarmStartConfig.batch_size)
    p.add_argument("--ws-lr", type=float, default=WarmStartConfig.lr)
    p.add_argument(
        "--ws-context-fraction", type=float, default=WarmStartConfig.context_fraction
    )
    p.add_argument(
        "--feedback-style", default="corrected", choices=["corrected", "wrong"]
    )
    p.add_argument("--num-known", type=int, default=6)
    p.add_argument("--cache-root", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    task = ToyTask(ToyConfig(feedback_style=args.feedback_style, num_known=args.num_known))
    model_cfg = toy_model_config(
        task,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
    )
    ws_cfg = WarmStartConfig(
        enabled=True,
        steps=args.ws_steps,
        batch_size=args.ws_batch,
        lr=args.ws_lr,
        context_fraction=args.ws_context_fraction,
    )
    t0 = time.perf_counter()
    base = tiny_model_dir(model_cfg, cache_root=args.cache_root)
    warm = warm_start_dir(base, task, ws_cfg, cache_root=args.cache_root, log_every=100)
    ws_seconds = time.perf_counter() - t0
    print(
        f"warm start: {warm} ({ws_seconds:.1f}s incl. any build; cached runs take ~0s)"
    )
    warm_model, tok = load_tiny(warm)
    test_examples = task.load("test")[: args.eval_prompts]
    step0 = evaluate_with_model(warm_model, tok, task, test_examples)
    print(
        f"step 0 (greedy, {len(test_examples)} test prompts): student {step0['student_accuracy']:.3f}  "
        f"self-teacher {step0['teacher_accuracy']:.3f}  "
        f"(on the student's failures: {step0['teacher_accuracy_on_failures']:.3f} of {int(step0['n_failures'])})"
    )

    results = {}
    for name in args.algorithms:
        results[name] = run(name, warm_model, tok, task, args, test_examples)

    print("\nval accuracy (greedy) by step")
    steps = [s for s, _ in next(iter(results.values()))[0]]
    print(
        f"{'algorithm':>10} "
        + " ".join(f"{s:>6}" for s in steps)
        + f" {'gain':>6} {'s/step':>7}"
    )
    for name, (curve, sec) in results.items():
        accs = [a for _, a in curve]
        print(
            f"{name:>10} "
            + " ".join(f"{a:>6.3f}" for a in accs)
            + f" {accs[-1] - accs[0]:>+6.3f} {sec:>7.2f}"
        )


if __name__ == "__main__":
    main()
