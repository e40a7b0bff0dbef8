"""Memory Fusion Network (Zadeh et al., AAAI 2018), as in the authors' released code (pliang279/MFN).

One LSTM per view (language, acoustic, visual), stepped together over the aligned bins; at every step
the Delta-memory Attention Network (DMAN) reads the concatenated cell states of the last `window` steps
and the Multi-view Gated Memory takes a gated update from it. The output network reads the final hidden
states and the memory. Each LSTM input is the view's features plus its presence flag (1: the utterance
has that modality), so an empty modality (all zeros) is told apart from an average one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from finetune.baselines.inputs import AlignedInputs, BatchSource
from finetune.config import MFNConfig
from pretrain.batch import Batch


def two_layer(n_in: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    """Linear-ReLU-Dropout-Linear: the shape of every network in the released MFN (NN1, NN2, gammas, output)."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


@dataclass
class MemoryStep:
    """One DMAN + gated memory step: attention over c^[t-1,t], the proposal, both gates and the new memory."""

    attention: Tensor  # [B, window * sum(cells)], a softmax over its last dim
    proposal: Tensor  # tanh(u_hat^t) [B, memory]
    retain: Tensor  # gamma1^t [B, memory]
    update: Tensor  # gamma2^t [B, memory]
    memory: Tensor  # u^t [B, memory]


@dataclass
class MFNState:
    """Final hidden state of each view's LSTM ([B, cells_m] each) and the final memory [B, memory]."""

    hidden: list[Tensor]
    memory: Tensor


class MFNCore(nn.Module):
    """The three LSTMs, the Delta-memory Attention Network and the Multi-view Gated Memory."""

    def __init__(self, input_dims: tuple[int, ...], cfg: MFNConfig) -> None:
        super().__init__()
        self.cells = list(cfg.cells)
        self.window = cfg.window
        self.memory_size = cfg.memory
        self.lstms = nn.ModuleList(nn.LSTMCell(d + 1, c) for d, c in zip(input_dims, self.cells))  # + presence flag
        star = cfg.window * sum(self.cells)  # c^[t-1,t]: the window's concatenated cell states
        self.attention = two_layer(star, cfg.attention_hidden, star, cfg.dropout)  # D_a (NN1)
        self.proposal = two_layer(star, cfg.proposal_hidden, cfg.memory, cfg.dropout)  # D_u (NN2)
        self.retain = two_layer(star + cfg.memory, cfg.gate_hidden, cfg.memory, cfg.dropout)  # D_gamma1
        self.update = two_layer(star + cfg.memory, cfg.gate_hidden, cfg.memory, cfg.dropout)  # D_gamma2

    def memory_step(self, c_star: Tensor, memory: Tensor) -> MemoryStep:
        """DMAN then the gated memory update, from c^[t-1,t] [B, window * sum(cells)] and u^{t-1} [B, memory]."""
        # DMAN: a^[t-1,t] = softmax(D_a(c^[t-1,t])) over all window * sum(cells) dims;
        # c_hat^[t-1,t] = c^[t-1,t] (.) a^[t-1,t] (only the dims that changed in a telling way pass).
        attention = F.softmax(self.attention(c_star), dim=-1)
        attended = c_star * attention
        # Multi-view Gated Memory: u_hat^t = D_u(c_hat); gamma1^t = D_gamma1([c_hat; u^{t-1}]),
        # gamma2^t = D_gamma2([c_hat; u^{t-1}]) (sigmoids); u^t = gamma1^t (.) u^{t-1} + gamma2^t (.) tanh(u_hat^t).
        proposal = torch.tanh(self.proposal(attended))
        both = torch.cat([attended, memory], dim=-1)
        retain = torch.sigmoid(self.retain(both))
        update = torch.sigmoid(self.update(both))
        return MemoryStep(attention, proposal, retain, update, retain * memory + update * proposal)

    def forward(self, seqs: list[Tensor], present: Tensor) -> MFNState:
        """Step the LSTMs over the bins of seqs ([B, T, D_m] per view), updating the memory at every step."""
        batch, steps = present.shape[0], seqs[0].shape[1]
        flags = present.to(seqs[0].dtype)
        inputs = [torch.cat([x, flags[:, i, None, None].expand(-1, steps, 1)], dim=-1) for i, x in enumerate(seqs)]
        zeros = [seqs[0].new_zeros(batch, c) for c in self.cells]
        hidden, cell = list(zeros), list(zeros)
        # Cell states before the first step are zeros, as the released code starts them.
        history = [torch.cat(zeros, dim=-1)] * (self.window - 1)
        memory = seqs[0].new_zeros(batch, self.memory_size)
        for t in range(steps):
            for i, lstm in enumerate(self.lstms):
                hidden[i], cell[i] = lstm(inputs[i][:, t], (hidden[i], cell[i]))
            history = [*history, torch.cat(cell, dim=-1)][-self.window:]
            memory = self.memory_step(torch.cat(history, dim=-1), memory).memory
        return MFNState(hidden, memory)


class MFN(nn.Module):
    """The `mfn` setting: aligned inputs -> MFNCore -> output network on [h_l; h_a; h_v; u] -> 4 class scores."""

    def __init__(self, embeddings: Tensor, dims: dict[str, int], cfg: MFNConfig, num_classes: int) -> None:
        super().__init__()
        self.inputs = AlignedInputs(embeddings, dims["acoustic_dim"], dims["visual_dim"], cfg.steps)
        self.core = MFNCore(self.inputs.dims, cfg)
        self.head = two_layer(sum(cfg.cells) + cfg.memory, cfg.output_hidden, num_classes, cfg.dropout)

    def forward(self, batch: Batch) -> Tensor:
        aligned = self.inputs(batch)
        state = self.core(aligned.seqs, aligned.present)
        return self.head(torch.cat([*state.hidden, state.memory], dim=-1))

    def loss(self, batch: Batch) -> Tensor:
        return F.cross_entropy(self(batch), batch.labels)

    def prepare(self, train: BatchSource, val: BatchSource) -> dict[str, Any]:
        """Fit-time hook: the input standardization on the training fold."""
        self.inputs.fit(train)
        return {}
