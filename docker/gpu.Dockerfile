# GPU image: CUDA + vLLM (the version the code is tested against, pinned in pyproject.toml's `gpu`
# extra; it brings its CUDA torch), for single- and multi-node runs.
#   docker build -f docker/gpu.Dockerfile -t distil_ray:gpu .
#   docker run --gpus all --shm-size=64g -v /shared:/shared distil_ray:gpu \
#       python -m distil_ray.main +experiment=sciknoweval hydra.run.dir=/shared/runs/ske
# Ray's object store lives in /dev/shm: give it room (--shm-size, or a memory emptyDir on Kubernetes).
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 VENV=/opt/venv PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev bubblewrap build-essential git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/distil_ray
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY distil_ray ./distil_ray
RUN PYTHON=python3.11 EXTRAS=gpu bash scripts/setup_env.sh && rm -rf /root/.cache/pip
COPY conf ./conf
COPY launch ./launch

CMD ["python", "-m", "distil_ray.main", "+experiment=sciknoweval"]
