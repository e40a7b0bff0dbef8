"""Host work per training micro-batch (aten ops dispatched), and the ceiling it puts on samples/s.

Runs forward + backward of each pretraining task for the base flavor on the `meta` device (shapes,
no data) under a dispatch mode that counts aten ops, split into metadata-only ops (views, detach:
host time, no kernel) and the rest (about one kernel launch each in eager mode; on a GPU, SDPA and
dropout run fused, so there are somewhat fewer than on meta, where attention is decomposed). The
counts barely depend on the micro-batch size. With a host cost per op (--kernel-us for a launching
op with autograd, --view-us for a view), a micro-batch cannot run faster than its host work,
whatever the GPU: this prints that ceiling in samples/s beside what the GPU's arithmetic allows at
a given MFU. When the ceiling is the lower figure, the step is host-bound: larger micro-batches, or
compiled layers that fuse kernels, are the remedy. Also sums the bytes autograd saves for backward (the
activation memory; meta tensors are fp32, so half of it approximates bf16) to show what fits.

    PYTHONPATH=. .venv/bin/python benchmarks/host_overhead.py [--flavor base] [--micro-batches 40,160,640]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import write_shards  # noqa: E402  (benchmarks/loader.py: realistic synthetic shards)

from pretrain.batch import stage  # noqa: E402
from pretrain.config import DataConfig, MaskConfig, ModelConfig  # noqa: E402
from pretrain.loader import build_loader  # noqa: E402
from pretrain.model import MEmoBERT  # noqa: E402
from pretrain.tasks import build_tasks  # noqa: E402

H100_BF16 = 989e12


VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "detach", "expand", "unsqueeze", "squeeze", "slice",
            "select", "permute", "as_strided", "alias", "reshape", "split", "unbind"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched while active (forward and backward): views apart from the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.views = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in VIEW_OPS:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Sums the bytes of tensors saved for backward, leaving out parameters (counted once elsewhere)."""

    def __init__(self, params: set[int]) -> None:
        self.bytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in params:
                self.bytes += t.numel() * t.element_size()
            return t

        super().__init__(pack, lambda t: t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="base")
    parser.add_argument("--micro-batches", default="40,160,640")
    parser.add_argument("--kernel-us", type=float, default=10.0, help="host microseconds per launching op")
    parser.add_argument("--view-us", type=float, default=2.0, help="host microseconds per view op")
    parser.add_argument("--mfu", type=float, default=0.4, help="GPU efficiency for the arithmetic-bound figure")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MEmoBERT.from_config(ModelConfig(flavor=args.flavor)).to("meta")
    tasks = build_tasks(MaskConfig(), mask_id=103, random_ids=(999, model.config.vocab_size))  # bert-base-uncased
    shards = write_shards(Path(tempfile.mkdtemp()), 4000, 4)
    print(f"flavor {args.flavor}; host-bound ceiling at {args.kernel_us:g} us per launching op, {args.view_us:g} us "
          f"per view; arithmetic bound: H100 bf16 at {args.mfu:.0%} MFU; ops are means over the four tasks")
    print(f"{'micro-batch':>11} {'launching ops':>14} {'view ops':>9} {'positions/sample':>17} "
          f"{'host-bound samples/s':>21} {'arithmetic-bound samples/s':>27} {'activations GiB (bf16)':>23}")
    for size in (int(s) for s in args.micro_batches.split(",")):
        loader = build_loader(str(shards), DataConfig(num_workers=0), batch_size=size, rank=0, world_size=1, seed=0,
                              cls_id=101, sep_id=102)
        batches = iter(loader)
        kernels, views, positions, samples, saved = [], [], 0, 0, []
        params = {id(p) for p in model.parameters()}
        for name, task in tasks.items():  # one batch per task: lengths vary as in training
            staged = stage(next(batches), "meta", torch.float32)
            counter, memory = OpCounter(), SavedBytes(params)
            with counter:
                task(model, staged, torch.Generator().manual_seed(0)).loss.backward()
            with memory:  # separately: the hooks change what autograd dispatches
                task(model, staged, torch.Generator().manual_seed(0)).loss.backward()
            kernels.append(counter.kernels)
            views.append(counter.views)
            saved.append(memory.bytes / 2 / 2**30)
            positions += staged.num_positions
            samples += staged.host.size
        per_sample = positions / samples
        kernel_ops, view_ops = sum(kernels) / len(kernels), sum(views) / len(views)
        host_bound = size / ((kernel_ops * args.kernel_us + view_ops * args.view_us) * 1e-6)
        arithmetic_bound = H100_BF16 * args.mfu / (model.flops_per_token(per_sample) * per_sample)
        print(f"{size:>11} {kernel_ops:>14,.0f} {view_ops:>9,.0f} {per_sample:>17.1f} {host_bound:>21,.0f} "
              f"{arithmetic_bound:>27,.0f} {max(saved):>23.1f}")


if __name__ == "__main__":
    main()
