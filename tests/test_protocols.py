"""Each published baseline's protocol is selected by `algorithm=` alone (conf/protocol/<task>_<algorithm>.yaml),
and `algorithm=distil` on an experiment runs the protocol of the baseline it is compared against there,
so a comparison changes only the loss. Values pinned here are the references' (docs/experiments.md)."""

import pytest

from distil_ray.config import compose_config


def composed(experiment, algorithm):
    return compose_config([f"+experiment={experiment}", f"algorithm={algorithm}"])


@pytest.mark.parametrize("experiment", ["sciknoweval", "lcb"])
def test_sdpo_runs_as_sdpo_runs(experiment):
    cfg = composed(experiment, "sdpo")
    assert cfg.model.enable_thinking is False  # SDPO's user.yaml: student and teacher
    assert cfg.teacher.backend == "learner" and cfg.teacher.support == "student"
    assert cfg.algorithm.loss["loss_agg"] == "seq-mean-token-mean-all"
    assert cfg.algorithm.loss["topk_norm"] == "tail"
    assert cfg.teacher.topk == {"sciknoweval": 100, "lcb": 20}[experiment]
    assert cfg.algorithm.loss["alpha"] == {"sciknoweval": 0.5, "lcb": 1.0}[experiment]
    assert cfg.learner.updates_per_batch == {"sciknoweval": 1, "lcb": 32}[experiment]
    loss = cfg.algorithm.loss
    assert (loss["is_mode"], loss["is_clip"], loss["rollout_is_clip"]) == ("two_factor", 2.0, 2.0)


@pytest.mark.parametrize("experiment", ["sciknoweval", "lcb"])
def test_sdpos_grpo_baseline(experiment):
    cfg = composed(experiment, "grpo")
    assert cfg.algorithm.advantages["normalize_std"] is False
    assert cfg.algorithm.loss["clip_ratio_c"] == 3.0
    assert cfg.algorithm.loss["loss_agg"] == "seq-mean-token-mean"
    assert cfg.learner.updates_per_batch == {"sciknoweval": 1, "lcb": 4}[experiment]


def test_opsd_runs_as_opsd_runs():
    cfg = composed("math", "opsd")
    assert cfg.teacher.backend == "learner" and cfg.teacher.update == "fixed"
    assert cfg.teacher.temperature == cfg.rollout.temperature == 1.1
    assert cfg.teacher.context == "reference_solution"
    assert cfg.algorithm.loss["loss_agg"] == "seq-mean-token-mean"


@pytest.mark.parametrize("experiment,baseline", [("sciknoweval", "sdpo"), ("lcb", "sdpo"), ("math", "opsd")])
@pytest.mark.parametrize("local", ["distil", "ce"])
def test_distil_and_ce_use_the_protocol_of_the_baseline_they_are_compared_against(experiment, baseline, local):
    ours, theirs = composed(experiment, local), composed(experiment, baseline)
    for section in ("teacher", "learner", "rollout", "model", "eval", "trainer", "replay"):
        assert getattr(ours, section) == getattr(theirs, section), section
    assert ours.algorithm.loss["loss_agg"] == theirs.algorithm.loss["loss_agg"]


def test_a_task_without_protocol_files_is_unchanged():
    for algorithm in ("sdpo", "grpo", "opsd"):
        cfg = composed("tiny", algorithm)
        assert cfg.teacher.backend == "vllm" and cfg.teacher.support == "teacher" and cfg.model.enable_thinking is None


def _keys(node, prefix=""):
    out = set()
    for k, v in (node or {}).items():
        if k == "defaults":
            continue
        path = f"{prefix}{k}"
        out |= _keys(v, path + ".") if isinstance(v, dict) else {path}
    return out


def _protocol_keys(path):
    import yaml

    node = yaml.safe_load(path.read_text()) or {}
    keys = _keys(node)
    for include in node.get("defaults", []):
        keys |= _protocol_keys(path.parent / f"{include}.yaml")
    return keys


def test_no_protocol_sets_a_key_its_experiment_sets():
    """Hydra merges a protocol before the +experiment: a key both set would silently keep the
    experiment's value, not the reference's."""
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parent.parent / "conf"
    for experiment in sorted((conf / "experiment").glob("*.yaml")):
        exp = yaml.safe_load(experiment.read_text())
        task = next(d["override /task"] for d in exp["defaults"] if isinstance(d, dict) and "override /task" in d)
        for protocol in sorted((conf / "protocol").glob(f"{task}_*.yaml")):
            both = _protocol_keys(protocol) & _keys(exp)
            assert not both, f"{protocol.name} and experiment/{experiment.name} both set {sorted(both)}"


def test_the_math_prompt_is_opsds():
    """OPSD's evaluation prompt, evaluate_math.py:340-342: the problem, a blank line, the instruction."""
    from distil_ray.tasks.math.prompts import build_messages

    cfg = composed("math", "opsd")
    (message,) = build_messages("What is 1+1?", cfg.task.kwargs["instruction"])
    assert message["content"] == "What is 1+1?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
