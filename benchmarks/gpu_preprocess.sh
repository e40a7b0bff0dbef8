#!/usr/bin/env bash
# Encoder throughput on the lent GPU (device tool, from the repo root, carrying .whl/ with the
# transformers 4.57 / tokenizers / huggingface_hub wheels): wav2vec2-base in fp32, bf16 and fp16,
# and the full DenseNet-BC-100 FER+ network, via benchmarks/encoders.py.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_preprocess_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 240 python3 benchmarks/encoders.py --arch base --dtypes float32,bfloat16,float16 --utterances 64 \
    --crops 9216 --repeats 3 2>&1 | grep -v Warning | tee "$OUT/encoders.txt"
