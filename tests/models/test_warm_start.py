"""Supervised warm start: cached by (base model, task config, warm-start config), atomic, and —
with the real configuration — a model whose feedback-conditioned self-teacher beats its student."""

from __future__ import annotations

import json

import pytest
import torch

from distil_ray.models import TinyModelConfig, load_tiny, tiny_model_dir
from distil_ray.models import warm_start as ws
from distil_ray.models.warm_start import (
    WarmStartConfig,
    evaluate_student_and_teacher,
    warm_start_dir,
)
from distil_ray.tasks.toy import ToyConfig, ToyTask, toy_model_config

FAST = WarmStartConfig(enabled=True, steps=3, batch_size=4, lr=1e-3)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_model_dir(TinyModelConfig(), cache_root=tmp_path_factory.mktemp("tiny"))


def test_cached_build_is_reused_and_keyed_by_every_config(
    base_dir, tmp_path, monkeypatch
):
    task = ToyTask()
    first = warm_start_dir(base_dir, task, FAST, cache_root=tmp_path)
    assert first.is_dir() and first.parent == tmp_path / "warm_start"
    meta = json.loads((first / "warm_start.json").read_text())
    assert meta["warm_start"]["steps"] == 3 and meta["task"] == task.config()
    assert meta["stats"]["steps"] == 3
    # the trained weights differ from the base model's
    base_model, _ = load_tiny(base_dir)
    warm_model, tok = load_tiny(first)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            base_model.state_dict().values(), warm_model.state_dict().values()
        )
    )
    assert tok.eos_token == "<|im_end|>"
    # no temp directories are left behind
    assert [p.name for p in (tmp_path / "warm_start").iterdir()] == [first.name]

    # a second call must not train: make training fail loudly if it is reached
    def no_training(*args, **kwargs):
        raise AssertionError("the cached warm start was rebuilt")

    monkeypatch.setattr(ws, "train_warm_start", no_training)
    assert warm_start_dir(base_dir, ToyTask(), FAST, cache_root=tmp_path) == first
    monkeypatch.undo()

    # any change of the warm-start or the task config gives another directory
    other_cfg = warm_start_dir(
        base_dir,
        task,
        WarmStartConfig(enabled=True, steps=3, batch_size=4, lr=2e-3),
        cache_root=tmp_path,
    )
    other_task = warm_start_dir(
        base_dir, ToyTask(ToyConfig(num_known=5)), FAST, cache_root=tmp_path
    )
    assert len({first, other_cfg, other_task}) == 3
    # disabled: the base model itself
    assert (
        warm_start_dir(
            base_dir, task, WarmStartConfig(enabled=False), cache_root=tmp_path
        )
        == base_dir
    )


def test_training_is_deterministic(base_dir):
    task = ToyTask()
    states = []
    for _ in range(2):
        model, tok = load_tiny(base_dir)
        stats = ws.train_warm_start(model, tok, task, FAST)
        states.append(model.state_dict())
        assert stats["first_loss"] > 0
    assert all(
        torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values())
    )


def test_bad_config_and_task_are_named():
    with pytest.raises(ValueError, match="warm_start.steps"):
        WarmStartConfig(steps=0).check()
    with pytest.raises(ValueError, match="warm_start.context_fraction"):
        WarmStartConfig(context_fraction=1.5).check()

    class NoWarmStart:
        name = "plain"

    with pytest.raises(TypeError, match="cannot be warm-started"):
        ws.cache_key("x", NoWarmStart(), FAST)


def test_evaluation_reports_student_and_teacher(base_dir):
    """On the untrained base model both are zero, and the numbers are consistent."""
    result = evaluate_student_and_teacher(base_dir, ToyTask(), n_prompts=8)
    assert result["n_prompts"] == 8
    assert result["student_accuracy"] == 0.0 and result["teacher_accuracy"] == 0.0
    assert result["n_failures"] == 8


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_warm_start_gives_a_teacher_better_than_its_student(tmp_path):
    """The configuration the tiny experiment uses: some success, and feedback that helps."""
    task = ToyTask()
    base = tiny_model_dir(toy_model_config(task), cache_root=tmp_path)
    result = evaluate_student_and_teacher(
        warm_start_dir(base, task, WarmStartConfig(enabled=True), cache_root=tmp_path), task
    )
    assert 0.05 <= result["student_accuracy"] <= 0.5, result
    # measured: student 0.27, self-teacher 1.00 (also 1.00 on the student's 93 failures)
    assert result["teacher_accuracy"] >= result["student_accuracy"] + 0.4, result
    assert result["teacher_accuracy_on_failures"] >= 0.9, result
