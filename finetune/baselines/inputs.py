"""The baselines' inputs: each modality of a Batch as `steps` aligned time bins, standardized, with a presence flag.

Language: the frozen word embeddings of a text BERT, averaged over each word's WordPiece tokens
(Batch.word_ids), one vector per word (MFN and M3ER read word-level GloVe vectors). Acoustic and visual:
the shards' frames. Alignment: each modality's valid entries (words or frames) are average-pooled into
`steps` equal bins, as adaptive average pooling bins them (bin b averages entries floor(b n / T) ..
ceil((b + 1) n / T) - 1 of n, so with fewer than T entries some repeat). Each modality spans the whole
utterance, so bin b of every modality covers about the same stretch of time; word timings are not in
the shards, so words are taken as evenly spread. An empty modality gives zeros and present = False.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from pretrain.batch import Batch

MODALITIES = ("text", "acoustic", "visual")  # MFN's order: language, acoustic, visual
BatchSource = Callable[[], Iterable[Batch]]  # a fresh pass over a split, batches on the model's device
WEIGHTS_NAME = "model.safetensors"
WORD_EMBEDDINGS_KEY = "embeddings.word_embeddings.weight"


@dataclass
class Aligned:
    """Per modality [B, steps, D_m] (zeros where absent), and which modalities each sample has: bool [B, 3]."""

    seqs: list[Tensor]
    present: Tensor

    def summaries(self) -> list[Tensor]:
        """Time-averaged features per modality [B, D_m]."""
        return [x.mean(1) for x in self.seqs]


@functools.lru_cache(maxsize=2)
def load_word_embeddings(folder: str) -> Tensor:
    """The word-embedding table [vocab, dim] of a text-BERT folder, read alone from its model.safetensors."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder} (config key 'mfn.word_embeddings')")
    with safe_open(str(path), "pt") as f:
        # BertModel names it embeddings.*, BertForMaskedLM and MEmoBERT exports bert.embeddings.*.
        keys = sorted((k for k in f.keys() if k.endswith(WORD_EMBEDDINGS_KEY)), key=len)
        if not keys:
            raise KeyError(f"{path} has no *{WORD_EMBEDDINGS_KEY}")
        return f.get_tensor(keys[0]).float()


def word_vectors(embeddings: Tensor, text_ids: Tensor, word_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Mean token embedding of each word: vectors [B, W, D] (words in order) and their mask [B, W]."""
    n_words = max(int(word_ids.max()) + 1, 1)  # word_ids is -1 at [CLS] / [SEP] / padding
    member = (word_ids[:, None, :] == torch.arange(n_words, device=word_ids.device)[None, :, None]).float()
    counts = member.sum(-1)
    vectors = member @ embeddings[text_ids] / counts.clamp(min=1)[..., None]
    return vectors, counts > 0


def time_bins(x: Tensor, mask: Tensor, steps: int) -> Tensor:
    """Average-pool each row's valid prefix (mask: bool [B, L], a prefix per row) of x [B, L, D] into `steps` bins."""
    n = mask.sum(1)[:, None, None]  # [B, 1, 1]
    b = torch.arange(steps, device=x.device)[None, :, None]
    start = b * n // steps
    end = ((b + 1) * n + steps - 1) // steps  # ceil: every bin gets at least one entry when n > 0
    pos = torch.arange(x.shape[1], device=x.device)[None, None, :]
    weights = ((pos >= start) & (pos < end)).to(x.dtype)
    return weights / weights.sum(-1, keepdim=True).clamp(min=1) @ x


class AlignedInputs(nn.Module):
    """Batch -> Aligned: word vectors and frames in `steps` bins, standardized with training-fold statistics."""

    def __init__(self, embeddings: Tensor, acoustic_dim: int, visual_dim: int, steps: int) -> None:
        super().__init__()
        # Frozen and large (vocab x dim): a non-persistent buffer, so it follows .to() but stays out of
        # the state dict the driver copies at every better epoch.
        self.register_buffer("embeddings", embeddings, persistent=False)
        self.steps = steps
        self.dims = (embeddings.shape[1], acoustic_dim, visual_dim)
        for name, dim in zip(MODALITIES, self.dims):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))

    def raw(self, batch: Batch) -> Aligned:
        """Aligned bins before standardization."""
        words, word_mask = word_vectors(self.embeddings, batch.text_ids, batch.word_ids)
        frames = [(words, word_mask), (batch.acoustic.float(), batch.acoustic_mask),
                  (batch.visual.float(), batch.visual_mask)]
        seqs = [time_bins(x, mask, self.steps) for x, mask in frames]
        return Aligned(seqs, torch.stack([mask.any(1) for _, mask in frames], dim=1))

    def forward(self, batch: Batch) -> Aligned:
        aligned = self.raw(batch)
        seqs = []
        for i, (name, x) in enumerate(zip(MODALITIES, aligned.seqs)):
            z = (x - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std")
            seqs.append(z * aligned.present[:, i, None, None])  # absent stays exactly zero
        return Aligned(seqs, aligned.present)

    @torch.no_grad()
    def fit(self, train: BatchSource) -> None:
        """Per-dimension mean and std of each modality's bins over the training samples that have it."""
        # wav2vec2 and DenseNet features differ in scale by orders of magnitude; LSTMs need them comparable.
        sums = [torch.zeros(d, dtype=torch.float64, device=self.text_mean.device) for d in self.dims]
        squares = [torch.zeros_like(s) for s in sums]
        counts = [0] * len(MODALITIES)
        for batch in train():
            aligned = self.raw(batch)
            for i, x in enumerate(aligned.seqs):
                rows = x[aligned.present[:, i]].reshape(-1, x.shape[-1]).double()
                sums[i] += rows.sum(0)
                squares[i] += (rows**2).sum(0)
                counts[i] += rows.shape[0]
        for name, s, sq, n in zip(MODALITIES, sums, squares, counts):
            if n == 0:  # a modality the fold never has: leave it as is (it is always zero)
                continue
            mean = s / n
            std = (sq / n - mean**2).clamp(min=0).sqrt().clamp(min=1e-6)
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(std)
