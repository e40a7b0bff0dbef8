"""Helper of test_pretrain's clipping test: a few optimizer steps of the real DeepSpeed engine on fixed
data, with the global batch of 8 split as the command line says.

    python tests/clip_split.py OUT 2x4 8x1                                      (one rank, splits in turn)
    python -m torch.distributed.run --nproc_per_node 2 tests/clip_split.py OUT 4x1   (2 ranks x 4)

MICROxACCUM per rank. Rank 0 writes OUT/<ranks>x<micro>x<accum>.pt: the parameters after the steps.
`global_batches` and `micro_loss` are what the test's plain-PyTorch reference uses too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memobert.config import load_config  # noqa: E402
from pretrain.batch import Batch, flat_positions, stage  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from tests.test_model import batch_of, make_utterance  # noqa: E402

GLOBAL_BATCH, STEPS, LR = 8, 3, 1e-3
# Scales the loss so that the gradient's norm lies between the thresholds that tell the authors'
# clipping from a 4x looser one (the test checks that it does).
LOSS_SCALE = 40.0


def global_batches() -> list[list]:
    """STEPS global batches of GLOBAL_BATCH utterances, all of one shape: every micro-batch mean is then
    a mean of per-sample means, so every split has the same average gradient."""
    rng = np.random.default_rng(0)
    return [[make_utterance(rng, f"{step}/{i}", 4, 6, 8) for i in range(GLOBAL_BATCH)] for step in range(STEPS)]


def micro_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean squared error of the acoustic head at every acoustic frame against 0.5 x the frame."""
    staged = stage(batch)
    positions = flat_positions(batch.acoustic_mask)
    pred = model(staged.device, layout=staged.layout, head="acoustic", positions=positions)
    target = 0.5 * staged.device.acoustic.flatten(0, 1)[positions].float()
    return LOSS_SCALE * (pred - target).pow(2).mean()


def config(micro: int, accum: int, world: int) -> PretrainConfig:
    """The tiny flavor without dropout, the default (recipe) clipping, AdamW and decay."""
    return load_config(PretrainConfig, overrides=[
        "model.flavor=tiny", "model.dropout=0", f"train.global_batch={micro * accum * world}",
        f"train.micro_batch={micro}", f"train.grad_accum={accum}", "train.steps=100", "optim.warmup_steps=0",
        f"optim.lr={LR}", "train.precision=fp32",
    ])


def main() -> None:
    import deepspeed

    from pretrain.model import MEmoBERT
    from pretrain.train import build_optimizer, deepspeed_config, init_distributed, linear_warmup_decay

    out = Path(sys.argv[1])
    rank, world = init_distributed()
    data = global_batches()
    for split in sys.argv[2:]:
        micro, accum = (int(x) for x in split.split("x"))
        cfg = config(micro, accum, world)
        torch.manual_seed(0)
        model = MEmoBERT.from_config(cfg.model)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(0, cfg.train.steps))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(cfg, bf16=False))
        for utts in data:
            mine = utts[rank * micro * accum:(rank + 1) * micro * accum]
            for i in range(accum):
                loss = micro_loss(engine, batch_of(mine[i * micro:(i + 1) * micro]))
                engine.backward(loss)
                engine.step()
        if rank == 0:
            params = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
            torch.save(params, out / f"{world}x{micro}x{accum}.pt")


if __name__ == "__main__":
    main()
