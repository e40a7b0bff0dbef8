"""M3ER (Mittal et al., AAAI 2020): modality check, proxy features, and MFN with the multiplicative loss.

Per sample, the modality check (modality_check.py) flags ineffective modalities; they and the empty ones
are replaced by proxy features (proxy.py) generated from the effective ones or, with the proxy off,
zeroed and marked absent. MFN (mfn.py) then fuses the three views. With the multiplicative loss, each
view gets its own prediction head on [h_i; u] (its LSTM's final state and the shared multi-view memory:
this is how p_i comes out of MFN), trained with the multiplicative combination loss (Liu et al. 2018);
the prediction is the product of the three distributions (the beta = 0 combination). Without it, MFN's
own output network on [h_l; h_a; h_v; u] with cross-entropy. With all three parts off this is `mfn`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from finetune.baselines.inputs import MODALITIES, Aligned, AlignedInputs, BatchSource
from finetune.baselines.mfn import MFNCore, MFNState, two_layer
from finetune.baselines.modality_check import ModalityCheck
from finetune.baselines.proxy import ProxyMaps
from finetune.config import M3ERConfig, MFNConfig
from pretrain.batch import Batch


def multiplicative_loss(log_probs: Tensor, labels: Tensor, beta: float) -> Tensor:
    """Multiplicative combination loss over M modality predictions (log_probs [M, B, C]), batch mean."""
    m = log_probs.shape[0]
    log_py = log_probs.gather(-1, labels.expand(m, -1)[..., None]).squeeze(-1)  # log p_i^y [M, B]
    # w_i = (prod_{j != i} (1 - p_j^y))^(beta / (M - 1)), L = -sum_i w_i log p_i^y (M3ER after Liu et al.),
    # in logs; p^y < 1 keeps log(1 - p^y) finite.
    log_miss = torch.log1p(-log_py.exp().clamp(max=1 - 1e-6))
    log_w = beta / (m - 1) * (log_miss.sum(0, keepdim=True) - log_miss)
    # The weights are per-sample importances (a modality matters less where the others are already right):
    # constants for the gradient, so each modality learns from its own weighted term only.
    weights = log_w.exp().detach()
    return -(weights * log_py).sum(0).mean()


class M3ER(nn.Module):
    """The `m3er` setting: aligned inputs -> check -> proxies -> MFNCore -> per-view heads (or MFN's head)."""

    def __init__(self, embeddings: Tensor, dims: dict[str, int], mfn: MFNConfig, cfg: M3ERConfig,
                 num_classes: int) -> None:
        super().__init__()
        # Built in MFN's order, so that with every part off the same seed gives the same weights as `mfn`.
        self.inputs = AlignedInputs(embeddings, dims["acoustic_dim"], dims["visual_dim"], mfn.steps)
        self.core = MFNCore(self.inputs.dims, mfn)
        self.multiplicative = cfg.multiplicative_loss
        if self.multiplicative:
            self.heads = nn.ModuleList(two_layer(c + mfn.memory, mfn.output_hidden, num_classes, mfn.dropout)
                                       for c in mfn.cells)
        else:
            self.head = two_layer(sum(mfn.cells) + mfn.memory, mfn.output_hidden, num_classes, mfn.dropout)
        self.check = ModalityCheck(self.inputs.dims, cfg.pca_dim, cfg.cca_dim) if cfg.modality_check else None
        self.proxy = ProxyMaps(self.inputs.dims, cfg.ridge) if cfg.proxy else None
        self.beta = cfg.beta
        self.thresholds = list(cfg.thresholds)

    def repair(self, aligned: Aligned) -> Aligned:
        """Ineffective modalities (empty, or flagged by the check) -> proxies where possible, else zeros and absent."""
        seqs = [x.float() for x in aligned.seqs]
        ineffective = ~aligned.present
        if self.check is not None:
            ineffective = ineffective | self.check([x.mean(1) for x in seqs], aligned.present)
        filled = torch.zeros_like(ineffective)
        if self.proxy is not None:
            seqs, filled = self.proxy(seqs, ineffective)
        dropped = ineffective & ~filled
        return Aligned([x * ~dropped[:, i, None, None] for i, x in enumerate(seqs)], ~dropped)

    def views(self, batch: Batch) -> MFNState:
        aligned = self.inputs(batch)
        # CCA scores and least squares are precision-sensitive: fp32 even under bf16 autocast.
        with torch.autocast(aligned.present.device.type, enabled=False):
            aligned = self.repair(aligned)
        return self.core(aligned.seqs, aligned.present)

    def view_log_probs(self, state: MFNState) -> Tensor:
        """log p_i per view [M, B, C], each from its head on [h_i; u]."""
        return torch.stack([F.log_softmax(head(torch.cat([h, state.memory], dim=-1)).float(), dim=-1)
                            for head, h in zip(self.heads, state.hidden)])

    def forward(self, batch: Batch) -> Tensor:
        state = self.views(batch)
        if self.multiplicative:
            return self.view_log_probs(state).sum(0)  # log of the product of the views' distributions
        return self.head(torch.cat([*state.hidden, state.memory], dim=-1))

    def loss(self, batch: Batch) -> Tensor:
        if self.multiplicative:
            return multiplicative_loss(self.view_log_probs(self.views(batch)), batch.labels, self.beta)
        return F.cross_entropy(self(batch), batch.labels)

    @torch.no_grad()
    def prepare(self, train: BatchSource, val: BatchSource) -> dict[str, Any]:
        """Fit-time hook: input statistics, the proxy maps and the CCA on training, the threshold on validation."""
        self.inputs.fit(train)
        info: dict[str, Any] = {}
        if self.proxy is not None:
            self.proxy.fit(self.inputs(batch) for batch in train())
        if self.check is not None:
            self.check.fit(*self._summaries(train))
            chosen = self.check.choose_threshold(*self._summaries(val), self.thresholds)
            if "val_flagged" in chosen:
                chosen["val_flagged"] = dict(zip(MODALITIES, chosen["val_flagged"]))
            info.update(chosen)
        return info

    def _summaries(self, source: BatchSource) -> tuple[list[Tensor], Tensor]:
        """Time-averaged standardized features per modality [N, D_m] and presence [N, M] over a split."""
        summaries, present = [], []
        for batch in source():
            aligned = self.inputs(batch)
            summaries.append(aligned.summaries())
            present.append(aligned.present)
        return [torch.cat(column) for column in zip(*summaries)], torch.cat(present)
