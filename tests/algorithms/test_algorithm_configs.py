"""Every conf/algorithm/*.yaml names a registered algorithm whose loss accepts exactly its keys."""

import inspect
from pathlib import Path

import pytest
import torch
import yaml

from distil_ray.algorithms import ALGORITHMS, get_algorithm
from distil_ray.algorithms.advantages import group_relative_advantages

CONF = Path(__file__).resolve().parents[2] / "conf" / "algorithm"


def test_one_config_per_algorithm():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(ALGORITHMS)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_keys_are_loss_arguments_and_the_loss_runs(path):
    cfg = yaml.safe_load(path.read_text())
    algorithm = get_algorithm(cfg["name"])
    params = inspect.signature(algorithm.loss_fn).parameters
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = set(cfg["loss"]) - set(params)
    assert not unknown or accepts_kwargs, f"{path.name}: {unknown} are not arguments of {algorithm.loss_fn.__name__}"

    gen = torch.Generator().manual_seed(0)
    B, T, K = 4, 6, 5
    logp = torch.log_softmax(torch.randn(B, T, K + 3, generator=gen), -1)
    mask = torch.ones(B, T)
    group_ids = torch.tensor([0, 0, 1, 1])
    if algorithm.needs_teacher:
        teacher = torch.log_softmax(torch.randn(B, T, K + 3, generator=gen), -1)[..., :K]
        args = (logp[..., 0], logp[..., :K], teacher, mask)
        extra = {"group_ids": group_ids} if "group_ids" in params or accepts_kwargs else {}
    elif algorithm.needs_advantages:
        adv = group_relative_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_ids, **cfg.get("advantages", {}))
        args, extra = (logp[..., 0], mask, adv), {}
    else:
        args, extra = (logp[..., 0], mask), {}
    loss, metrics = algorithm.loss_fn(*args, **cfg["loss"], **extra)
    assert torch.isfinite(loss) and metrics
