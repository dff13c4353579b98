# Source on the GPU machine, from the project's root, before running Python there:
#   source bench/gpu_env.sh
# Needs .gpuassets/ carried (built here by bench/make_gpuassets.sh). Based on ../shared/gpu/env.sh (verified
# 2026-11-28 on the nvidia-h200 image: python 3.12, torch 2.11.0+cu130, transformers 5.17.0, peft 0.21).
if [ ! -f /tmp/gpusite/.unpacked ]; then
  mkdir -p /tmp/gpusite && tar -C /tmp/gpusite -xJf .gpuassets/site.tar.xz && touch /tmp/gpusite/.unpacked
fi
export PYTHONPATH=/tmp/gpusite:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
export UNSLOTH_DISABLE_STATISTICS=1                 # else Unsloth tries a hub download at load
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1        # torchao's C++ .so files are trimmed from the site
export PYTORCH_ALLOC_CONF=expandable_segments:True  # what unsloth_zoo sets on itself at import
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# Prefect: ephemeral server, no telemetry, no UI (trimmed from the site), its own home.
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED=false PREFECT_SERVER_UI_ENABLED=false
export PREFECT_HOME=${PREFECT_HOME:-/tmp/prefect-home}
# The project's model cache, seeded with SmolLM2's tokenizer so loraflow:tiny-llama builds offline.
export LORAFLOW_CACHE_DIR=${LORAFLOW_CACHE_DIR:-/tmp/loraflow-cache}
mkdir -p "$LORAFLOW_CACHE_DIR/models" && cp -rn .gpuassets/models/. "$LORAFLOW_CACHE_DIR/models/"
# `loraflow` on PATH as `make install` would put it
mkdir -p /tmp/gpubin && printf '#!/bin/sh\nexec python3 -m cli "$@"\n' > /tmp/gpubin/loraflow && chmod +x /tmp/gpubin/loraflow
export PATH=/tmp/gpubin:$PATH
# Several GPUs (nvidia-h200-x2 and up): NVLink multicast stays off in NCCL, PyTorch and NVSHMEM (the device tool's
# KINDS.md); the training ranks inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
