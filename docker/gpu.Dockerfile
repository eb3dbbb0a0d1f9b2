# GPU image: CUDA + upstream vLLM (which brings its CUDA torch) + flash-attn, for multi-node runs.
#   docker build -f docker/gpu.Dockerfile -t distil_ray:gpu .
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 VENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev bubblewrap build-essential git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/distil_ray
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY distil_ray ./distil_ray
RUN PYTHON=python3.11 EXTRAS=gpu bash scripts/setup_env.sh \
    && /opt/venv/bin/pip install --no-build-isolation flash-attn \
    && rm -rf /root/.cache/pip
COPY conf ./conf
COPY launch ./launch
