#!/bin/bash
# Builds .gpuassets/ (git-ignored), what a device call carries to the H200 machine, whose image has torch,
# transformers, peft and accelerate but no Unsloth, bitsandbytes, TRL, datasets, Prefect or pydantic:
#   .gpuassets/site.tar.xz   Unsloth's stack (../shared/gpu/make_gpusite.sh, trimmed to CUDA 13.0) plus the
#                            Prefect flow's stack (bench/gpu_wheels.txt), one xz archive (~25 MiB; unpacked
#                            ~160 MiB, over the 64 MiB a call may carry, so it travels packed)
#   .gpuassets/models/smollm2-135m-instruct/   SmolLM2's tokenizer and config only (no weights): enough for
#                            the built-in loraflow:tiny-llama, which the GPU tests build there from it
# Run here, from the project's root, after `make install`:   bash bench/make_gpuassets.sh
# Then, in each device call: carry [".gpuassets"] and start the command with `source bench/gpu_env.sh;`.
set -euo pipefail
SHARED=${SHARED:-../shared}
PY=${PY:-.venv/bin/python}

bash "$SHARED/gpu/make_gpusite.sh"            # .gpusite/: unsloth, unsloth_zoo, bitsandbytes, trl, datasets...
mkdir -p .whl/flow
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 -d .whl/flow -r bench/gpu_wheels.txt

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -a .gpusite/. "$stage/"
for w in .whl/flow/*.whl; do unzip -qo "$w" -d "$stage"; done
rm -rf "$stage"/prefect/server/ui "$stage"/prefect/server/ui-v2   # the web UI: never served on a worker
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .gpuassets
tar -C "$stage" -cf - . | xz -T0 -6 > .gpuassets/site.tar.xz

# SmolLM2's tokenizer (converted here once by the project's own code), without its 270 MB of weights.
tok=$("$PY" -c 'from loraflow.models import resolve_model; print(resolve_model("loraflow:smollm2-135m-instruct"))')
rm -rf .gpuassets/models && mkdir -p .gpuassets/models/smollm2-135m-instruct
cp "$tok"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} \
  .gpuassets/models/smollm2-135m-instruct/
du -sh .gpuassets .gpuassets/*
