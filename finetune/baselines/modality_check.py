"""M3ER's modality check (Mittal et al., AAAI 2020): CCA between modality summaries flags ineffective modalities.

Summaries: each modality's time-averaged standardized features, reduced by PCA fitted on the training
fold. For every pair of modalities, CCA fitted on the training samples that have both gives canonical
variates; a sample's pair score is the correlation of its two variate vectors (a cosine weighted by the
canonical correlations, so that weak canonical directions count less). A modality is ineffective for a
sample when its score with every other modality the sample has falls under the threshold tau: a noisy
modality agrees with neither other one, while the two clean ones still agree with each other (our
reading of M3ER's check, which compares pairs). When that would flag every modality the sample has
(e.g. two modalities that disagree), nothing is flagged: no modality is more trustworthy than another.

Tau is chosen on the validation speaker from a grid: the value that best tells the samples' own
modalities from mismatched ones (a modality swapped with another validation utterance's), by balanced
accuracy. M3ER does not publish how it set its threshold.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# Covariance ridge, relative to the mean variance: keeps the whitening finite on small folds.
COVARIANCE_RIDGE = 1e-3
SWAP_SEED = 0  # the validation swaps are fixed, so a rerun chooses the same threshold


def pca(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Mean [D] and the top-k principal directions [D, k] of rows x [N, D] (zero columns past the rank)."""
    mean = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    components = x.new_zeros(x.shape[1], k)
    n = min(k, vt.shape[0])
    components[:, :n] = vt[:n].T
    return mean, components


def inverse_sqrt(c: Tensor) -> Tensor:
    """C^(-1/2) of a symmetric positive definite matrix."""
    values, vectors = torch.linalg.eigh(c)
    return vectors * values.clamp(min=torch.finfo(c.dtype).tiny).rsqrt() @ vectors.T


def cca(x: Tensor, y: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Canonical weights for x [N, Dx] and y [N, Dy] ([Dx, k], [Dy, k]; centred inputs) and the k correlations."""
    n = max(x.shape[0] - 1, 1)
    cxx, cyy, cxy = x.T @ x / n, y.T @ y / n, x.T @ y / n
    # Whiten each side, then the SVD of the whitened cross-covariance gives the canonical pairs (Hotelling).
    wx = inverse_sqrt(cxx + _ridge(cxx))
    wy = inverse_sqrt(cyy + _ridge(cyy))
    u, s, vt = torch.linalg.svd(wx @ cxy @ wy)
    return wx @ u[:, :k], wy @ vt.T[:, :k], s[:k].clamp(0, 1)


def _ridge(c: Tensor) -> Tensor:
    scale = torch.trace(c) / c.shape[0] if torch.trace(c) > 0 else c.new_tensor(1.0)
    return COVARIANCE_RIDGE * scale * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


class ModalityCheck(nn.Module):
    """Per-pair CCA projections of modality summaries; flags modalities that correlate with no other one."""

    def __init__(self, dims: Sequence[int], pca_dim: int, cca_dim: int) -> None:
        super().__init__()
        self.pairs = list(itertools.combinations(range(len(dims)), 2))
        pcs = [min(pca_dim, d) for d in dims]
        for i, j in self.pairs:
            k = min(cca_dim, pcs[i], pcs[j])
            # Each side folds PCA and CCA into one affine map: u = (s - center) @ weight.
            for m in (i, j):
                self.register_buffer(f"center_{i}{j}_{m}", torch.zeros(dims[m]))
                self.register_buffer(f"weight_{i}{j}_{m}", torch.zeros(dims[m], k))
            self.register_buffer(f"rho_{i}{j}", torch.zeros(k))
        self.pcs = pcs
        self.register_buffer("threshold", torch.tensor(0.0))

    @torch.no_grad()
    def fit(self, summaries: Sequence[Tensor], present: Tensor) -> None:
        """PCA per modality, then CCA per pair, on training summaries ([N, D_m] each; present bool [N, M])."""
        s = [x.double() for x in summaries]
        reduced = [pca(x[present[:, m]], self.pcs[m]) if present[:, m].sum() > 1 else None for m, x in enumerate(s)]
        for i, j in self.pairs:
            rows = present[:, i] & present[:, j]
            if rows.sum() < 2 or reduced[i] is None or reduced[j] is None:
                continue  # the fold never has this pair: its score stays 0 (below any positive threshold)
            z = [(s[m][rows] - reduced[m][0]) @ reduced[m][1] for m in (i, j)]
            means = [x.mean(0) for x in z]
            a_i, a_j, rho = cca(z[0] - means[0], z[1] - means[1], self.rho(i, j).numel())
            for m, a, zbar in ((i, a_i, means[0]), (j, a_j, means[1])):
                mean, components = reduced[m]
                # (s - mean) @ V - zbar == (s - (mean + zbar @ V^T)) @ V, V having orthonormal columns.
                getattr(self, f"center_{i}{j}_{m}").copy_(mean + zbar @ components.T)
                getattr(self, f"weight_{i}{j}_{m}").copy_(components @ a)
            self.rho(i, j).copy_(rho)

    def rho(self, i: int, j: int) -> Tensor:
        return getattr(self, f"rho_{i}{j}")

    def pair_scores(self, summaries: Sequence[Tensor], i: int, j: int) -> Tensor:
        """Per-sample correlation [B] of the canonical variates of modalities i and j."""
        u = [(summaries[m].float() - getattr(self, f"center_{i}{j}_{m}")) @ getattr(self, f"weight_{i}{j}_{m}")
             for m in (i, j)]
        rho = self.rho(i, j)
        dot = (rho * u[0] * u[1]).sum(-1)
        norms = ((rho * u[0] ** 2).sum(-1) * (rho * u[1] ** 2).sum(-1)).sqrt()
        return dot / norms.clamp(min=1e-12)

    def scores(self, summaries: Sequence[Tensor], present: Tensor) -> Tensor:
        """Per sample and modality [B, M]: the best pair score with another present modality (-inf if none)."""
        best = torch.full(present.shape, float("-inf"), device=present.device)
        for i, j in self.pairs:
            both = present[:, i] & present[:, j]
            score = torch.where(both, self.pair_scores(summaries, i, j), float("-inf"))
            best[:, i] = torch.maximum(best[:, i], score)
            best[:, j] = torch.maximum(best[:, j], score)
        return best

    def forward(self, summaries: Sequence[Tensor], present: Tensor) -> Tensor:
        """Ineffective modalities, bool [B, M]: present, and under the threshold with every other present one."""
        flagged = present & (self.scores(summaries, present) < self.threshold)
        return flagged & ~(flagged == present).all(1, keepdim=True)

    @torch.no_grad()
    def choose_threshold(self, summaries: Sequence[Tensor], present: Tensor, grid: Sequence[float]) -> dict[str, Any]:
        """Set the threshold from `grid` that best separates own from swapped modalities on validation summaries."""
        clean = self.scores(summaries, present)
        generator = torch.Generator().manual_seed(SWAP_SEED)
        swapped = torch.full_like(clean, float("-inf"))
        for m in range(present.shape[1]):
            rows = present[:, m].nonzero().squeeze(1)
            order = rows[torch.randperm(len(rows), generator=generator).to(rows.device)]
            mixed = list(summaries)
            mixed[m] = summaries[m].clone()
            mixed[m][order] = summaries[m][order.roll(1)]  # a cyclic shift: no sample keeps its own
            swapped[:, m] = self.scores(mixed, present)[:, m]
        judged = present & (present.sum(1, keepdim=True) > 1)  # a lone modality has nothing to agree with
        own, other = clean[judged], swapped[judged]
        if len(own) == 0:
            return {"threshold": float(self.threshold)}
        accuracy = [0.5 * ((own >= t).float().mean() + (other < t).float().mean()).item() for t in grid]
        best = max(range(len(grid)), key=lambda k: accuracy[k])  # ties: the first (lowest) threshold
        self.threshold.fill_(grid[best])
        flagged = self(summaries, present).sum(0) / present.sum(0).clamp(min=1)
        return {"threshold": float(grid[best]), "threshold_balanced_accuracy": accuracy[best],
                "val_flagged": flagged.tolist()}
