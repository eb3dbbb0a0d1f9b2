"""The GPU learner check stays runnable where only torch and transformers are installed (the lent
GPU machines have no Ray, vLLM, Hydra or OmegaConf): its smoke shape runs here with those blocked."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ["ray", "vllm", "hydra", "omegaconf", "datasets", "math_verify"]


@pytest.mark.timeout(180)
def test_gpu_learner_check_runs_without_ray_or_vllm():
    code = (
        "import sys, runpy\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        "sys.argv = ['gpu_learner_check.py', '--smoke', '--no-tests']\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_learner_check.py')!r}, run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:3] == ["variant", "load", "s"])
    rows = {line.rsplit(maxsplit=10)[0]: line.rsplit(maxsplit=10)[1:] for line in lines[at + 1:at + 3]}
    assert set(rows) == {"one per micro-batch", "packed"}
    for values in rows.values():
        assert all(v != "nan" for v in values[:4])  # load s, step s, tokens/s, peak GiB
    # the packed variant packs several sequences per micro-batch, and takes the same loss
    assert float(rows["packed"][7]) < float(rows["one per micro-batch"][7])
    assert "loss difference" in lines[at + 3]
    assert float(lines[at + 3].split("difference ")[1].split()[0]) < 1e-2
