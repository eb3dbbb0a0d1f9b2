"""A Hugging Face model from a training checkpoint, for any step:

    python -m distil_ray.export RUN_DIR/checkpoints/step_000040 OUT_DIR [--model MODEL_PATH]

The checkpoint's sharded policy weights (DCP, as the learner ranks wrote them) are read in one
process, into a model built from the config of the model the run started from (recorded in the
checkpoint; ``--model`` for a checkpoint that does not record it), and written with
``save_pretrained`` together with that model's tokenizer. ``AutoModelForCausalLM.from_pretrained
(OUT_DIR)`` then loads the policy exactly as the learner held it. Neither Ray nor a process group
is needed.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def export(checkpoint: str | Path, out: str | Path, model_path: str | None = None) -> Path:
    """Write the checkpoint's policy to ``out`` as a HF model directory; returns ``out``."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from transformers import AutoConfig, AutoModelForCausalLM

    from distil_ray.learner.loading import parameters_on_meta
    from distil_ray.learner.worker import copy_model_files

    root = Path(checkpoint)
    state_file = root / "learner_state.pkl"
    if not state_file.is_file() or not (root / "dcp").is_dir():
        raise FileNotFoundError(f"{root}: not a training checkpoint (needs learner_state.pkl and dcp/)")
    model_path = model_path or pickle.loads(state_file.read_bytes()).get("model_path")
    if model_path is None:
        raise ValueError(f"{root} does not record the model it started from: pass --model MODEL_PATH")
    # parameters allocated empty and then filled from the checkpoint; buffers (rotary
    # frequencies, in no checkpoint) as the config makes them
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    target = {"model": model.state_dict()}
    saved = {key.split(".", 1)[1] for key in FileSystemReader(str(root / "dcp")).read_metadata().state_dict_metadata
             if key.startswith("model.")}
    missing = [k for k in target["model"] if k not in saved and not _tied(model, k)]
    if missing:
        raise ValueError(f"{root}: the checkpoint has no weights for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (another model? pass --model)")
    dcp.load(target, checkpoint_id=str(root / "dcp"), planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    model.tie_weights()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copy_model_files(model_path, out)
    return out


def _tied(model, key: str) -> bool:
    """Whether ``key`` is a tied alias (the LM head sharing the input embedding)."""
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory, e.g. RUN_DIR/checkpoints/step_000040")
    parser.add_argument("out", type=Path, help="where the HF model directory is written")
    parser.add_argument("--model", default=None, help="the model the run started from (when the checkpoint does not say)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.model)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(EXIT_BAD_INPUT)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
