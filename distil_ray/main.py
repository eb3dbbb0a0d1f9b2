"""Entry point: ``python -m distil_ray.main +experiment=NAME key=value ...``

Hydra composes ``conf/config.yaml`` (or ``$DISTIL_RAY_CONF/config.yaml``) with the overrides;
``--cfg job`` prints the composed config, ``-m a=x,y`` runs one job per value, each in its own
run directory. Before anything starts, the config is validated (``distil_ray.config.validate``):
a wrong key or value prints one line naming it, ``rollout.engine='vlm': allowed values are
'vllm', 'hf'``, and exits with status 2 — no traceback. The run directory (Hydra's output
directory) receives ``resolved_config.yaml``; then ``Trainer(cfg, run_dir).fit()`` runs. An
environment error found after that (a cluster too small for the actors, a model path or data file
that is missing or malformed) is reported the same way, one line and status 2; a run that has to
stop (an actor past ``trainer.actor_timeout_s``, ``trainer.max_bad_steps`` non-finite steps) says
why in one line and exits with status 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import ClassVar

from distil_ray.config import (
    ConfigError,
    config_dir,
    config_error_from_exception,
    register_configs,
    validate,
)

CONFIG_ERROR_EXIT = 2
RUN_STOPPED_EXIT = 1


class _State:
    # Exceptions raised by a run (after its config was accepted): they keep their traceback even
    # when they happen to come from Hydra or OmegaConf.
    run_errors: ClassVar[set[int]] = set()


def _fail(err: ConfigError) -> None:
    sys.stderr.write(f"{err}\n")
    sys.stderr.flush()
    sys.exit(CONFIG_ERROR_EXIT)


def run(cfg) -> dict:
    """One job: validate, write the resolved config, train. ``cfg`` is Hydra's composed DictConfig."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    try:
        run_cfg = validate(cfg)
    except ConfigError as e:
        # Exiting here (rather than raising) stops a multirun at the bad job instead of after
        # the whole batch, because Hydra's launcher collects ordinary exceptions per job.
        _fail(e)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run_cfg), resolve=True))

    # Imported only now: printing or rejecting a config should not pay for torch, Ray and vLLM.
    from distil_ray.trainer import RunStopped, Trainer

    # a sweep's jobs: named by their overrides, grouped by the sweep (what wandb shows)
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode is not None and str(hydra_cfg.mode).endswith("MULTIRUN")
    name = hydra_cfg.job.override_dirname or run_dir.name
    group = Path(hydra_cfg.sweep.dir).name if multirun else None
    try:
        return Trainer(run_cfg, run_dir, run_name=name if multirun else run_dir.name, group=group).fit()
    except ConfigError as e:  # found after start-up: the cluster, the model path, the data
        _fail(e)
    except RunStopped as e:  # an actor past its deadline, too many non-finite steps: the line says it all
        sys.stderr.write(f"run stopped: {e}\n")
        sys.stderr.flush()
        sys.exit(RUN_STOPPED_EXIT)
    except Exception as e:
        _State.run_errors.add(id(e))
        raise


def main() -> None:
    import hydra

    register_configs()
    conf = config_dir()
    if not (conf / "config.yaml").is_file():
        _fail(ConfigError(f"DISTIL_RAY_CONF={str(conf)!r}: no config.yaml there"))
    # Hydra would print its own multi-line report of a composition error and exit 1; with this set
    # it raises instead, so the error can be reported here as one line naming the key.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    entry = hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(run)
    try:
        entry()
    except Exception as e:
        if id(e) in _State.run_errors:
            raise
        err = config_error_from_exception(e)
        if err is None:
            raise
        _fail(err)


if __name__ == "__main__":
    main()
