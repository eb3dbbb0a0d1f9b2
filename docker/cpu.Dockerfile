# CPU image: the same stack the tests run on (vLLM's CPU build, gloo, tiny local models).
#   docker build -f docker/cpu.Dockerfile -t distil_ray:cpu .
#   docker build -f docker/cpu.Dockerfile --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index> -t distil_ray:cpu .
# Without TORCH_INDEX_URL pip takes torch from the default index (a larger CUDA build that also runs on CPU).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# bubblewrap: the code sandbox's namespaces; build-essential: packages that compile at install time
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
