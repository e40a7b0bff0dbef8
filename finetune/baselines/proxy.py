"""M3ER's proxy features: an ineffective modality regenerated from the effective ones by a linear map.

M3ER learns a linear transform from the effective modalities' features to the ineffective one on the
training data. Here: one least-squares map (with a bias) per target modality and set of source
modalities, bin t of the sources -> bin t of the target over the aligned bins, fitted on the training
bins where all of them are present, with a small ridge for conditioning (the language side alone has
384-768 dims). Three modalities give 3 targets x 3 source sets = 9 maps; a sample uses the map of
its own set of effective modalities.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from finetune.baselines.inputs import Aligned


def routes(n_modalities: int) -> list[tuple[int, tuple[int, ...]]]:
    """(target, sources) for every target and every non-empty set of the other modalities."""
    out = []
    for target in range(n_modalities):
        others = [m for m in range(n_modalities) if m != target]
        for size in range(1, len(others) + 1):
            out += [(target, sources) for sources in itertools.combinations(others, size)]
    return out


class ProxyMaps(nn.Module):
    """The least-squares maps from each set of source modalities to each target, and their use per sample."""

    def __init__(self, dims: Sequence[int], ridge: float) -> None:
        super().__init__()
        self.dims = list(dims)
        self.ridge = ridge
        self.routes = routes(len(dims))
        for target, sources in self.routes:
            n_in = sum(self.dims[s] for s in sources) + 1  # + bias
            self.register_buffer(self._name(target, sources), torch.zeros(n_in, self.dims[target]))

    @staticmethod
    def _name(target: int, sources: tuple[int, ...]) -> str:
        return f"map_{target}_from_{''.join(map(str, sources))}"

    def weight(self, target: int, sources: tuple[int, ...]) -> Tensor:
        return getattr(self, self._name(target, sources))

    @torch.no_grad()
    def fit(self, train: Iterable[Aligned]) -> None:
        """Solve every map's ridge-regularized normal equations, accumulated over the training batches."""
        gram = {r: 0.0 for r in self.routes}
        cross = {r: 0.0 for r in self.routes}
        for aligned in train:
            for target, sources in self.routes:
                rows = aligned.present[:, [target, *sources]].all(1)
                x = _design([aligned.seqs[s][rows] for s in sources]).double()
                y = aligned.seqs[target][rows].reshape(-1, self.dims[target]).double()
                gram[target, sources] = gram[target, sources] + x.T @ x
                cross[target, sources] = cross[target, sources] + x.T @ y
        for route in self.routes:
            g = gram[route]
            if not torch.is_tensor(g) or g[-1, -1] == 0:  # never all present together in the fold: proxy 0
                continue
            d = g.shape[0] - 1
            energy = torch.trace(g[:d, :d]) / d
            penalty = torch.zeros_like(g)
            # Ridge on the weights, not the bias, scaled by the mean feature energy (1 for all-zero features):
            # with it the system is positive definite even for constant or collinear features.
            scale = self.ridge * (energy if energy > 0 else 1.0)
            penalty[:d, :d] = scale * torch.eye(d, dtype=g.dtype, device=g.device)
            self.weight(*route).copy_(torch.linalg.solve(g + penalty, cross[route]))

    def forward(self, seqs: Sequence[Tensor], ineffective: Tensor) -> tuple[list[Tensor], Tensor]:
        """Replace each ineffective modality by its proxy from the sample's effective ones.

        seqs: [B, T, D_m] per modality; ineffective: bool [B, M]. Returns the new seqs and which entries
        were filled (an ineffective modality with no effective one to map from is left as it was).
        """
        effective = ~ineffective
        out = list(seqs)
        filled = torch.zeros_like(ineffective)
        for target, sources in self.routes:
            others = [m for m in range(len(self.dims)) if m != target]
            wanted = torch.tensor([m in sources for m in others], device=ineffective.device)
            rows = ineffective[:, target] & (effective[:, others] == wanted).all(1)
            proxy = _design([seqs[s] for s in sources]) @ self.weight(target, sources)
            out[target] = torch.where(rows[:, None, None], proxy.view_as(seqs[target]), out[target])
            filled[:, target] |= rows
        return out, filled


def _design(parts: list[Tensor]) -> Tensor:
    """Concatenated source bins with a bias column, one row per (sample, bin): [N * T, sum(D) + 1]."""
    x = torch.cat(parts, dim=-1)
    x = x.reshape(-1, x.shape[-1])
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=-1)
