#!/usr/bin/env bash
# Pretraining speed on the lent GPU (run through the device tool from the repo root, carrying .whl/:
# the wheels of deepspeed, webdataset, transformers 4.57 and their missing deps, plus vocab/vocab.txt).
# Prints: DeepSpeed vs plain PyTorch step time (base flavor, bf16, micro-batch 160 x 4 = 640), then the
# real `memobert pretrain` loop with loader workers: samples/s, MFU, data-wait %, and the projected
# hours of the paper's 40K x 640 schedule on one GPU. Each part runs even if an earlier one failed.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_pretrain_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

echo "== DeepSpeed vs plain PyTorch, base flavor, bf16"
timeout 150 python3 benchmarks/train_step.py --flavor base --micro-batch 160 --grad-accum 4 --steps 6 --warmup 2 \
    --samples 2400 --vocab .whl/vocab 2>&1 | grep -v "Gloo\|WARNING" | tee "$OUT/train_step.txt"

echo "== memobert pretrain, base flavor, bf16, 8 loader workers"
python3 - <<'PY'
import sys; sys.path.insert(0, "benchmarks")
from pathlib import Path
from loader import write_shards
Path("/tmp/shards").mkdir(exist_ok=True)
write_shards(Path("/tmp/shards"), 6400, 16, vocab=".whl/vocab")
PY
timeout 170 python3 -m memobert.cli pretrain --config configs/pretrain/memobert_base.yaml model.init_from=null \
    data.train_shards=/tmp/shards data.val_shards= data.num_workers=8 train.steps=40 train.log_every=10 \
    optim.warmup_steps=10 train.out_dir=/tmp/run train.ckpt_every=1000000 train.val_every=1000000 2>&1 \
    | grep -v "Gloo\|WARNING" | tail -20 | tee "$OUT/pretrain.txt"
python3 - <<'PY' | tee "$OUT/summary.txt"
import json
rows = [json.loads(l) for l in open("/tmp/run/metrics.jsonl") if "samples_per_s" in l]
steady = rows[1:] or rows  # the first window holds CUDA start-up and the first loader fill
sps = sum(r["samples_per_s"] for r in steady) / len(steady)
mfu = [r["mfu"] for r in steady if "mfu" in r]
wait = sum(r["data_wait_pct"] for r in steady) / len(steady)
print(f"steady windows: {len(steady)} x 10 steps of 640 samples")
print(f"samples/s: {sps:.0f}   MFU: {sum(mfu) / len(mfu):.1%}" if mfu else f"samples/s: {sps:.0f}   MFU: n/a")
print(f"data wait: {wait:.1f}% of step time")
print(f"projected 40,000 x 640 samples on this GPU: {40000 * 640 / sps / 3600:.2f} h")
PY
