#!/usr/bin/env bash
# Pretraining speed on the lent GPU, in one device call (6-9 minutes; give it timeout_s=600): prepare .whl/ with
# benchmarks/gpu_wheels.sh, then run(command="bash benchmarks/gpu_pretrain.sh", carry=[".whl"]).
#
# The real `memobert pretrain` loop (base flavor, bf16, loader with 8 workers, 12,800 synthetic samples
# of realistic sizes in two ~1 GB shards, as preprocessing writes them: a micro-batch of 640 needs a
# shard of several pools of 640 to bucket by length) in four variants, baseline first so every ratio
# comes from the same machine:
#   A  micro-batch 160 x 4 accumulation, eager       (the configuration measured at 10.6% MFU)
#   B  micro-batch 640 x 1, eager                     (a quarter of the launches per sample)
#   C  micro-batch 160 x 4, train.compile=true        (fused encoder layers)
#   D  micro-batch 640 x 1, train.compile=true
# Each runs 40 steps; the summary averages steps 11-30 (the first window holds start-up and compiling)
# and prints samples/s, MFU, data-wait %, peak memory, the projected hours of 40K x 640 on this GPU and
# the speedup over A. A and D also profile steps 32-34 (train.profile_steps): the top ops by GPU time
# and the share of wall time the GPU was busy. Each variant runs even if an earlier one failed.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_pretrain_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1
  echo "C compiler for triton: $(command -v gcc || command -v cc || echo none)"
} | tee "$OUT/gpu.txt"

python3 - <<'PY'
import sys; sys.path.insert(0, "benchmarks")
from pathlib import Path
from loader import write_shards
Path("/tmp/shards").mkdir(exist_ok=True)
write_shards(Path("/tmp/shards"), 12800, 2, vocab=".whl/vocab")  # ~1 GB shards, as preprocessing writes
PY

variant() {  # name, time limit (s), overrides...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" python3 -m memobert.cli pretrain --config configs/pretrain/memobert_base.yaml model.init_from=none \
      data.train_shards=/tmp/shards data.val_shards= data.num_workers=8 train.steps=40 train.log_every=10 \
      optim.warmup_steps=10 "train.out_dir=/tmp/run_$name" train.ckpt_every=1000000 train.val_every=1000000 "$@" 2>&1 \
      | tr '\r' '\n' | sed 's/.*\(step\/s\|s\/step\)[^]]*\]//' | grep -v "Gloo\|WARNING\|^\s*$" | tail -32 > "$OUT/pretrain_$name.txt"
  tail -5 "$OUT/pretrain_$name.txt"
}
variant A 90 train.profile_steps=[32,35]
variant B 90 train.micro_batch=640 train.grad_accum=1
variant C 160 train.compile=true
variant D 160 train.micro_batch=640 train.grad_accum=1 train.compile=true train.profile_steps=[32,35]

python3 - <<'PY' | tee "$OUT/summary.txt"
import json
from pathlib import Path

def steady(name):
    path = Path(f"/tmp/run_{name}/metrics.jsonl")
    rows = [json.loads(l) for l in path.open()] if path.is_file() else []
    profile = next((r for r in rows if "profile/ms_per_step" in r), {})
    # Steps 11-30: the first window holds CUDA start-up, compilation and the first loader fill; the
    # last one the profiler's overhead.
    return [r for r in rows if "samples_per_s" in r and 10 < r["step"] <= 30], profile

base = None
for name, label in [("A", "160x4 eager"), ("B", "640x1 eager"), ("C", "160x4 compiled"), ("D", "640x1 compiled")]:
    rows, profile = steady(name)
    if not rows:
        print(f"{name} {label:15s} no steady window (failed or too slow; see pretrain_{name}.txt)")
        continue
    sps = sum(r["samples_per_s"] for r in rows) / len(rows)
    mfu = sum(r.get("mfu", 0.0) for r in rows) / len(rows)
    wait = sum(r["data_wait_pct"] for r in rows) / len(rows)
    mem = max(r.get("max_mem_gib", 0.0) for r in rows)
    base = base or (sps if name == "A" else None)
    ratio = f"{sps / base:.2f}x A" if base else "A missing"
    print(f"{name} {label:15s} {sps:7.0f} samples/s  MFU {mfu:6.1%}  data wait {wait:4.1f}%  peak {mem:5.1f} GiB  "
          f"40Kx640 in {40000 * 640 / sps / 3600:.2f} h  ({ratio}, {len(rows)} windows of 10 steps)")
    if profile:
        print(f"  profiled steps 32-34: {profile['profile/ms_per_step']:.0f} ms/step, "
              f"GPU busy {profile.get('profile/device_busy_pct', float('nan')):.0f}% of wall time")
PY
