"""The run configuration: every shipped config composes and validates, and a wrong key or value
fails before anything starts, with one line naming the key (and, from the command line, exit 2)."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from distil_ray.algorithms import ALGORITHMS
from distil_ray.config import (
    ConfigError,
    RunConfig,
    compose_config,
    config_dir,
    to_run_config,
    validate,
)
from distil_ray.feedback.templates import RepromptConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _names(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _main(*args, cwd, env=None):
    # cwd: a scratch directory, since Hydra creates the run directory (outputs/...) there
    return subprocess.run(
        [sys.executable, "-m", "distil_ray.main", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, **(env or {})},
    )


# --------------------------------------------------------------------------- shipped configs


def test_conf_dir_is_the_repository_tree():
    assert config_dir() == CONF
    assert (CONF / "config.yaml").is_file()


def test_every_algorithm_composes_with_the_tiny_experiment():
    assert set(_names("algorithm")) == set(ALGORITHMS)
    for name in _names("algorithm"):
        cfg = compose_config(["+experiment=tiny", f"algorithm={name}"])
        assert isinstance(cfg, RunConfig)
        assert cfg.algorithm.name == name
        # the group file's loss keys arrive verbatim
        assert cfg.algorithm.loss == (yaml.safe_load((CONF / "algorithm" / f"{name}.yaml").read_text())["loss"] or {})


def test_tiny_experiment_values():
    cfg = compose_config(["+experiment=tiny"])
    assert (cfg.task.name, cfg.model.path, cfg.warm_start.enabled) == ("toy", None, True)
    assert (cfg.learner.world_size, cfg.rollout.engine, cfg.teacher.backend) == (2, "vllm", "vllm")
    assert cfg.algorithm.name == "distil"


@pytest.mark.parametrize("task", _names("task"))
def test_every_task_composes(task):
    cfg = compose_config([f"task={task}"])
    assert cfg.task.name == task


def test_task_kwargs_match_the_real_constructors():
    assert compose_config(["task=sciknoweval"]).task.kwargs["domains"] == ["chemistry", "physics", "biology", "material"]
    assert compose_config(["task=math"]).task.kwargs["test"] == ["aime24", "amc23", "minerva_math"]
    assert compose_config(["task=livecodebench"]).task.kwargs["version_tag"] == "release_v6"


@pytest.mark.parametrize("model", _names("model"))
def test_every_model_composes(model):
    cfg = compose_config([f"model={model}"])
    if model == "tiny":
        assert cfg.model.path is None and cfg.model.dtype == "float32"
    else:
        assert "/" in cfg.model.path and cfg.model.dtype == "bfloat16"


def test_experiment_group_only_holds_valid_presets():
    for name in _names("experiment"):
        assert isinstance(compose_config([f"+experiment={name}"]), RunConfig)


def test_defaults_validate():
    cfg = validate(RunConfig())
    assert cfg.rollout.n_samples == 4 and cfg.teacher.topk == 20


def test_sections_are_the_classes_their_users_take():
    """One class each: the tiny model, the warm start and the reprompt section are the objects
    the model builder, the warm start and the teacher read, not mirrors of them."""
    from distil_ray.models.config import TinyModelConfig, WarmStartConfig

    cfg = compose_config(["+experiment=tiny", "teacher.reprompt.strip_thinking=false", "model.tiny.seed=3"])
    assert type(cfg.teacher.reprompt) is RepromptConfig and cfg.teacher.reprompt.strip_thinking is False
    assert type(cfg.model.tiny) is TinyModelConfig and cfg.model.tiny.seed == 3
    assert type(cfg.warm_start) is WarmStartConfig and cfg.warm_start.enabled


def test_overrides_reach_the_object():
    cfg = compose_config(["+experiment=tiny", "rollout.n_samples=8", "learner.betas=[0.8,0.95]", "rollout.stop=[x,y]"])
    assert cfg.rollout.n_samples == 8 and cfg.learner.betas == [0.8, 0.95] and cfg.rollout.stop == ["x", "y"]


def test_dict_input_is_merged_on_the_schema():
    cfg = validate({"rollout": {"engine": "hf"}, "algorithm": {"name": "grpo", "loss": {"clip_eps_low": 0.1}}})
    assert cfg.rollout.engine == "hf" and cfg.algorithm.loss == {"clip_eps_low": 0.1}
    assert cfg.rollout.n_samples == 4  # schema default kept


def test_resume_accepts_an_existing_directory(tmp_path):
    assert compose_config([f"trainer.resume={tmp_path}"]).trainer.resume == str(tmp_path)
    assert compose_config(["trainer.resume=auto"]).trainer.resume == "auto"


# --------------------------------------------------------------------------- errors


def _error(overrides):
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override", ["rollout.nsamples=3", "+rollout.nsamples=3"])
def test_unknown_key_is_named_with_the_allowed_keys(override):
    message = _error(["+experiment=tiny", override])
    assert message.startswith("rollout.nsamples: unknown key")
    assert "n_samples" in message and "max_new_tokens" in message


def test_unknown_top_level_and_nested_keys():
    assert _error(["+bogus=1"]).startswith("bogus: unknown key")
    assert _error(["+teacher.reprompt.strip=1"]).startswith("teacher.reprompt.strip: unknown key")
    with pytest.raises(ConfigError, match=r"^learner\.lrr: unknown key"):
        to_run_config({"learner": {"lrr": 1.0}})


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.engine=vlm", "rollout.engine='vlm': allowed values are 'vllm', 'hf'"),
        ("teacher.backend=grpc", "teacher.backend='grpc': allowed values are 'vllm', 'hf', 'http'"),
        ("teacher.backend=http", "teacher.update='ema': an http expert's weights are its own"),
        ("teacher.context=both", "teacher.context='both': allowed values are 'reprompt', 'reference_solution'"),
        ("learner.backend=mpi", "learner.backend='mpi': allowed values are 'gloo', 'nccl'"),
        ("learner.dtype=fp16", "learner.dtype='fp16': allowed values are 'float32', 'bfloat16'"),
        ("model.dtype=half", "model.dtype='half': allowed values are 'float32', 'bfloat16'"),
        ("logging.wandb_mode=cloud", "logging.wandb_mode='cloud': allowed values are 'offline', 'online', 'disabled'"),
        ("trainer.resume=/no/such/dir", "trainer.resume='/no/such/dir': allowed values are 'never', 'auto' or an existing"),
        ("rollout.n_samples=0", "rollout.n_samples=0: must be >= 1"),
        ("rollout.temperature=-0.5", "rollout.temperature=-0.5: must be >= 0"),
        ("rollout.top_p=0", "rollout.top_p=0.0: must lie in (0, 1]"),
        ("rollout.top_p=1.5", "rollout.top_p=1.5: must lie in (0, 1]"),
        ("eval.top_p=0", "eval.top_p=0.0: must lie in (0, 1]"),
        ("learner.world_size=0", "learner.world_size=0: must be >= 1"),
        ("trainer.prompts_per_step=0", "trainer.prompts_per_step=0: must be >= 1"),
        ("trainer.total_steps=0", "trainer.total_steps=0: must be >= 1"),
        ("teacher.topk=0", "teacher.topk=0: must be >= 1"),
        ("teacher.topk=1000", "teacher.topk=1000: must be <= model.tiny.vocab_size=512"),
        ("replay.max_staleness=-1", "replay.max_staleness=-1: must be >= 0"),
        ("replay.capacity=10", "replay.capacity=10: must be >= max(1, replay.max_staleness) * trainer.prompts_per_step * rollout.n_samples = 32"),
        ("eval.max_prompts=0", "eval.max_prompts=0: must be >= 1"),
        ("learner.betas=[0.9]", "learner.betas=[0.9]: must be two numbers in [0, 1)"),
        ("rollout.n_samples=many", "rollout.n_samples: Value 'many' of type 'str' could not be converted to Integer"),
        ("model.tiny.head_dim=48", "model.tiny.head_dim=48 is not supported"),
        ("task.name=chess", "task.name='chess': allowed values are"),
        ("algorithm.name=ppo", "algorithm.name='ppo': allowed values are 'distil', 'ce', 'sdpo', 'opsd', 'grpo', 'sft'"),
        ("algorithm=ppo", "algorithm=ppo: no such config; allowed values are 'ce', 'distil', 'grpo', 'opsd', 'sdpo', 'sft'"),
        ("weight_sync.backend=nccl", "weight_sync.backend='nccl': allowed values are 'object_store', 'collective'"),
        ("weight_sync.bucket_mb=0", "weight_sync.bucket_mb=0: must be >= 1"),
        ("weight_sync.timeout_s=0", "weight_sync.timeout_s=0.0: must be > 0"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    assert _error(["+experiment=tiny", override]).startswith(expected)


def test_loss_keys_are_checked_against_the_loss_signature():
    message = _error(["+experiment=tiny", "+algorithm.loss.gama=0.5"])
    assert message.startswith("algorithm.loss.gama: unknown key for algorithm 'distil'; allowed keys are")
    assert "gamma" in message and "baseline" in message
    # arguments the learner supplies per batch are not configuration
    assert "group_ids" not in message and "denominator" not in message
    # sft has its own, smaller, set
    assert _error(["algorithm=sft", "+algorithm.loss.gamma=1"]).startswith("algorithm.loss.gamma: unknown key for algorithm 'sft'")


def test_loss_values_are_checked_by_running_the_loss():
    assert _error(["algorithm.loss.baseline=mean"]) == "algorithm.loss.baseline='mean': allowed values are ('none', 'group')"
    assert _error(["algorithm.loss.gamma=2"]) == "algorithm.loss.gamma=2: must lie in [0, 1]"
    assert _error(["algorithm=sdpo", "algorithm.loss.topk_norm=softmax"]).startswith("algorithm.loss.topk_norm='softmax'")
    # opsd words its error after the inner JSD argument; the message still names the config key
    assert _error(["algorithm=opsd", "algorithm.loss.beta=1.5"]).startswith("algorithm.loss.beta=1.5: rejected by opsd_loss")
    assert _error(["algorithm=grpo", "+algorithm.loss.clip_ratio_c=0.5"]).startswith("algorithm.loss.clip_ratio_c=0.5")


def test_ce_rejects_the_future_credit_it_switches_off():
    assert _error(["algorithm=ce", "+algorithm.loss.future_credit_coef=1"]).startswith("algorithm.loss.future_credit_coef")


def test_advantage_keys():
    assert _error(["algorithm=grpo", "+algorithm.advantages.normalise=true"]).startswith(
        "algorithm.advantages.normalise: unknown key; allowed keys are eps, normalize_std"
    )
    assert _error(["algorithm=grpo", "rollout.n_samples=1"]).startswith("rollout.n_samples=1: algorithm 'grpo' needs >= 2")


def test_task_kwargs_are_checked_without_building_the_task():
    message = _error(["task=sciknoweval", "+task.kwargs.domain=physics"])
    assert message.startswith("task.kwargs.domain: unknown key for task 'sciknoweval'; allowed keys are domains, data_dir")
    assert _error(["task=math", "+task.kwargs.split=x"]).startswith("task.kwargs.split: unknown key for task 'math'")


def test_reprompt_template_placeholders():
    message = _error(["+experiment=tiny", "teacher.reprompt.feedback_template='{feedback}'"])
    assert message.startswith("teacher.reprompt.feedback_template: cannot be formatted")
    assert "{feedback_raw}" in message


def test_validate_on_an_object():
    cfg = RunConfig()
    cfg.rollout.temperature = -1.0
    with pytest.raises(ConfigError, match=r"^rollout\.temperature=-1\.0: must be >= 0"):
        validate(cfg)


# --------------------------------------------------------------------------- the command line


def test_cli_bad_value_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = _main("+experiment=tiny", "rollout.engine=bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "rollout.engine='bogus': allowed values are 'vllm', 'hf'\n"
    assert result.stdout == ""


def test_cli_unknown_key_exits_2(tmp_path):
    result = _main("+experiment=tiny", "rollout.nsamples=3", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rollout.nsamples: unknown key; allowed keys under 'rollout' are")
    assert result.stdout == ""


def test_cli_bad_loss_value_exits_2_in_a_multirun(tmp_path):
    # the first job already fails validation: nothing trains, and the sweep stops there
    result = _main("-m", "+experiment=tiny", "algorithm=distil,ce", "algorithm.loss.loss_agg=sum", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("algorithm.loss.loss_agg='sum': allowed values are")
    assert "Traceback" not in result.stderr


def test_cli_cfg_job_prints_the_composed_config(tmp_path):
    result = _main("+experiment=tiny", "rollout.n_samples=6", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["rollout"]["n_samples"] == 6
    assert printed["algorithm"]["name"] == "distil" and printed["task"]["name"] == "toy"
    assert printed["learner"]["world_size"] == 2
    assert "hydra" not in printed


def test_cli_conf_dir_from_environment(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    tiny = conf / "experiment" / "tiny.yaml"
    tiny.write_text(tiny.read_text().replace("n_samples: 4", "n_samples: 3"))
    result = _main("+experiment=tiny", "--cfg", "job", cwd=tmp_path, env={"DISTIL_RAY_CONF": str(conf)})
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["rollout"]["n_samples"] == 3

    missing = _main("--cfg", "job", cwd=tmp_path, env={"DISTIL_RAY_CONF": str(tmp_path / "nowhere")})
    assert missing.returncode == 2 and missing.stderr.startswith("DISTIL_RAY_CONF=")


def test_hydra_settings():
    root = OmegaConf.load(CONF / "config.yaml")
    assert root.hydra.job.chdir is False
    assert root.hydra.run.dir.startswith("outputs/")
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "outputs/" in ignored and "multirun/" in ignored


def test_a_section_checks_itself_outside_a_run():
    """An actor built from a section alone (a test, a script) fails with the same message as a run."""
    from distil_ray.config import LearnerConfig, RolloutConfig, TeacherConfig

    with pytest.raises(ConfigError, match=r"^learner\.dtype='fp16': allowed values are 'float32', 'bfloat16'$"):
        LearnerConfig(dtype="fp16").check()
    with pytest.raises(ConfigError, match=r"^rollout\.top_p=0\.0: must lie in \(0, 1\]$"):
        RolloutConfig(top_p=0.0).check()
    with pytest.raises(ConfigError, match=r"^teacher\.reprompt\.solution_template: cannot be formatted"):
        TeacherConfig(reprompt=RepromptConfig(solution_template="{x}")).check()


def test_loss_values_of_the_wrong_type_name_the_key():
    assert _error(["algorithm.loss.gamma=fast"]) == "algorithm.loss.gamma='fast': must be a number"
    assert _error(["algorithm=sdpo", "algorithm.loss.is_clip=off"]) == "algorithm.loss.is_clip='off': must be a number (or null)"
    assert _error(["algorithm.loss.baseline=1"]) == "algorithm.loss.baseline=1: must be str"
    # every hyper-parameter reaches the learner, defaults included
    cfg = compose_config(["algorithm=grpo"])
    assert cfg.algorithm.loss_kwargs()["clip_eps_high"] == 0.28


def test_actor_cpu_shares_must_fit_the_local_cluster():
    from distil_ray.config import ConfigError, compose_config

    with pytest.raises(ConfigError, match=r"ray.num_cpus=2: the actors ask for 2.75 CPUs \(.*learner.num_cpus \* learner.world_size = 2"):
        compose_config(["+experiment=tiny", "learner.num_cpus=1"])
    # grpo starts no teacher, so its share does not count
    compose_config(["+experiment=tiny", "algorithm=grpo", "learner.num_cpus=0.75"])


def test_allowed_values_are_named_before_ranges_and_keys_keep_their_order():
    # with several errors the misspelt choice comes first, whichever section holds it
    assert _error(["rollout.num_workers=0", "teacher.backend=x"]).startswith("teacher.backend='x'")
    assert "allowed keys under 'rollout' are engine, num_workers, num_cpus, num_gpus, n_samples" in _error(
        ["rollout.nsamples=3"])


def test_a_task_value_of_the_wrong_type_says_so():
    message = _error(["+experiment=tiny", "+task.kwargs.num_symbols=abc"])
    assert message.startswith("task.kwargs: a value of the wrong type for task 'toy'") and "ToyConfig" in message


def test_collective_weight_sync_needs_vllm_engines_that_follow_the_policy():
    base = ["+experiment=tiny", "weight_sync.backend=collective"]
    assert _error(base + ["rollout.engine=hf"]).startswith(
        "weight_sync.backend=collective: rollout.engine='hf' has no weight-transfer API")
    assert _error(base + ["teacher.backend=hf", "teacher.update=current"]).startswith(
        "weight_sync.backend=collective: teacher.backend='hf'")
    assert _error(base + ["teacher.backend=hf", "teacher.update=ema"]).startswith(
        "weight_sync.backend=collective: teacher.backend='hf'")  # it receives the learners' average
    # a fixed teacher receives nothing: any engine serves it
    validate(compose_config(base + ["teacher.backend=hf", "teacher.update=fixed"]))
    # nor does a teacher the learner ranks run: they hold its weights
    assert not validate(compose_config(base + ["teacher.backend=learner", "teacher.update=ema"])).teacher.follows_policy
    assert _error(base + ["learner.backend=nccl", "learner.num_gpus=1"]).startswith(
        "rollout.num_gpus=0.0: weight_sync.backend=collective")
    assert _error(base + ["weight_sync.timeout_s=4000"]).startswith("weight_sync.timeout_s=4000.0: at most")
