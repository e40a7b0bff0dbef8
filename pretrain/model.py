"""MEmoBERT: one BERT encoder over `[CLS] text [SEP] | visual frames | acoustic frames`, plus the pretraining heads.

Shape: a named flavor (FLAVORS) when training from scratch; with `ModelConfig.init_from` the text-BERT
folder's own config.json defines the shape (layers, hidden size, vocab) and the flavor is ignored.
Embedders follow the authors' UNITER fork (docs/recipe.md); the three
modalities are packed compactly per sample (valid text, valid visual, valid acoustic, then padding)
so one attention mask covers the whole sequence and padding costs nothing in the middle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import BertConfig, BertForMaskedLM, BertModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from memobert.config import from_dict, to_dict
from pretrain.batch import Batch, PackedLayout, at_positions, compact_layout
from pretrain.config import ModelConfig

logger = logging.getLogger(__name__)

# BertConfig fields of each named shape. base is BERT-base (the paper); debug fits one GPU with room
# to spare; tiny is for CPU tests.
FLAVORS: dict[str, dict] = {
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=30522),
    "debug": dict(num_hidden_layers=6, hidden_size=512, num_attention_heads=8, intermediate_size=2048, vocab_size=30522),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=30522),
}

VISUAL_TYPE, ACOUSTIC_TYPE = 1, 2  # token type ids; text is 0, BERT's default
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Heads the forward can apply: name -> the modality whose hidden states it reads.
HEADS = {"mlm": "text", "visual": "visual", "acoustic": "acoustic", "fer": "visual"}


@dataclass
class Encoded:
    """Encoder outputs: per-modality hidden states (arbitrary values at padding) and the compact sequence."""

    text: Tensor  # [B, Lt, H]
    visual: Tensor  # [B, Lv, H]
    acoustic: Tensor  # [B, La, H]
    sequence: Tensor  # [B, L, H], L = longest text + visual + acoustic of the batch
    sequence_mask: Tensor  # bool [B, L]

    @property
    def cls(self) -> Tensor:
        """[CLS] hidden state [B, H]: text comes first, so it sits at position 0."""
        return self.sequence[:, 0]


class FrameEmbedder(nn.Module):
    """Visual or acoustic frames -> hidden: LN(Linear(x)) + own position + type embedding -> LN -> dropout."""

    def __init__(self, raw_dim: int, config: BertConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(raw_dim, config.hidden_size)
        self.proj_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Added to masked frames (after zeroing them) in raw-feature space, as the authors do.
        self.mask_embedding = nn.Parameter(torch.zeros(raw_dim))

    def forward(self, frames: Tensor, type_embedding: Tensor, masked: Tensor | None = None) -> Tensor:
        x = frames.to(self.proj.weight.dtype)  # shards store float16; follow the model's dtype
        if masked is not None:
            m = masked.unsqueeze(-1)
            x = x.masked_fill(m, 0.0) + m.to(x.dtype) * self.mask_embedding
        h = self.proj_norm(self.proj(x))
        # Positions restart at 0 for each modality.
        h = h + self.position_embeddings.weight[: h.shape[1]] + type_embedding
        return self.dropout(self.norm(h))


class FrameRegressionHead(nn.Module):
    """hidden -> raw frame feature: Linear-GELU-LN, then the output matrix (the input projection's, when tied)."""

    def __init__(self, hidden: int, raw_dim: int, eps: float, tied: bool) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps))
        self.weight = None if tied else nn.Parameter(torch.empty(raw_dim, hidden))
        self.bias = nn.Parameter(torch.zeros(raw_dim))

    def forward(self, hidden: Tensor, proj_weight: Tensor) -> Tensor:
        # proj_weight is the input projection's [hidden, raw] matrix; used transposed when tied
        # (passed in rather than stored, so the parameter has one owner).
        weight = proj_weight.t() if self.weight is None else self.weight
        return F.linear(self.transform(hidden), weight, self.bias)


class ClassificationHead(nn.Module):
    """hidden -> logits: Linear-GELU-LN-Linear (the authors' RegionClassification, used for FER+)."""

    def __init__(self, hidden: int, num_classes: int, eps: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps), nn.Linear(hidden, num_classes)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden)


class MEmoBERT(nn.Module):
    """BERT over text + visual + acoustic with the MLM, frame-regression and FER+ heads."""

    def __init__(self, config: BertConfig, model_cfg: ModelConfig) -> None:
        super().__init__()
        if config.type_vocab_size < 3:
            raise ValueError(f"type_vocab_size is {config.type_vocab_size}; text, visual and acoustic need 3")
        config._attn_implementation = "sdpa"
        self.config = config
        self.model_cfg = model_cfg
        h, eps = config.hidden_size, config.layer_norm_eps
        # The pooler is never used (heads read [CLS] or frame states directly); dropping it keeps
        # every parameter reachable from a loss.
        self.bert = BertModel(config, add_pooling_layer=False)
        self.visual_embed = FrameEmbedder(model_cfg.visual_dim, config)
        self.acoustic_embed = FrameEmbedder(model_cfg.acoustic_dim, config)
        # `cls` as in BertForMaskedLM, so exported weights load there too.
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        tied = model_cfg.tie_frame_regression
        self.visual_head = FrameRegressionHead(h, model_cfg.visual_dim, eps, tied)
        self.acoustic_head = FrameRegressionHead(h, model_cfg.acoustic_dim, eps, tied)
        self.fer_head = ClassificationHead(h, model_cfg.vprob_dim, eps)
        for module in (self.visual_embed, self.acoustic_embed, self.visual_head, self.acoustic_head, self.fer_head):
            module.apply(self._init_new)
        self.cls.predictions.transform.apply(self._init_new)
        self.cls.predictions.bias.data.zero_()

    def _init_new(self, module: nn.Module) -> None:
        """BERT's initialisation (normal(0, initializer_range), LayerNorm 1/0) for the non-BERT modules."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, FrameEmbedder):
            nn.init.normal_(module.mask_embedding, std=std)
        elif isinstance(module, FrameRegressionHead):
            nn.init.zeros_(module.bias)
            if module.weight is not None:
                nn.init.normal_(module.weight, std=std)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int | None = None) -> "MEmoBERT":
        """Random init from the flavor's shape, or from the text BERT in `model_cfg.init_from` (its shape wins)."""
        if model_cfg.text_bert:
            model = cls.from_text_bert(model_cfg.text_bert, model_cfg)
            if vocab_size is not None and vocab_size != model.config.vocab_size:
                raise ValueError(f"vocab_size {vocab_size} != {model.config.vocab_size} of {model_cfg.text_bert}")
            return model
        shape = dict(FLAVORS[model_cfg.flavor])
        if vocab_size is not None:
            shape["vocab_size"] = vocab_size
        return cls(_bert_config(BertConfig(**shape), model_cfg), model_cfg)

    @classmethod
    def from_text_bert(cls, folder: str | Path, model_cfg: ModelConfig) -> "MEmoBERT":
        """Initialise the backbone (and the MLM head, when the folder has one) from a local text-BERT folder.

        The token type table grows from 2 to 3 rows: visual frames use BERT's row 1, the acoustic row
        keeps its fresh BERT-style init, as the authors' separate speech type embedding does.
        """
        mlm, info = BertForMaskedLM.from_pretrained(str(folder), output_loading_info=True)
        model = cls(_bert_config(mlm.config, model_cfg), model_cfg)
        state = mlm.bert.state_dict()
        key = "embeddings.token_type_embeddings.weight"
        loaded = state[key]
        state[key] = torch.cat([loaded, model.bert.embeddings.token_type_embeddings.weight.detach()[loaded.shape[0]:]])
        model.bert.load_state_dict(state)
        has_head = not any(k.startswith("cls.predictions.transform") for k in info["missing_keys"])
        if has_head:
            model.cls.load_state_dict(mlm.cls.state_dict())
        logger.info("initialised from %s (%s); MLM head %s", folder, _shape(model.config), "loaded" if has_head else "new")
        return model

    # ---- forward ------------------------------------------------------------------------------

    def encode(
        self,
        batch: Batch,
        text_ids: Tensor | None = None,
        visual_masked: Tensor | None = None,
        acoustic_masked: Tensor | None = None,
        layout: PackedLayout | None = None,
    ) -> Encoded:
        """Embed the three modalities, pack them compactly, run the shared encoder, unpack per modality.

        `layout` is the packing of batch's masks (pretrain.batch.stage computes it on the host);
        without it, it is computed here, which reads the packed width from the device.
        """
        ids = batch.text_ids if text_ids is None else text_ids
        types = self.bert.embeddings.token_type_embeddings.weight
        embeds = [
            self.bert.embeddings(input_ids=ids),  # word + position + type 0, LayerNorm, dropout
            self.visual_embed(batch.visual, types[VISUAL_TYPE], visual_masked),
            self.acoustic_embed(batch.acoustic, types[ACOUSTIC_TYPE], acoustic_masked),
        ]
        if layout is None:
            layout = compact_layout([batch.text_mask, batch.visual_mask, batch.acoustic_mask])
        hidden = embeds[0].shape[-1]
        x = torch.cat(embeds, dim=1).gather(1, layout.gather.unsqueeze(-1).expand(-1, -1, hidden))
        # Additive key mask [B, 1, 1, L]: padding is masked as keys only, so no query row is fully masked.
        bias = torch.zeros(layout.mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~layout.mask, torch.finfo(x.dtype).min)[:, None, None, :]
        out = self.bert.encoder(x, attention_mask=bias).last_hidden_state
        text, visual, acoustic = (out.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden)) for idx in layout.unpack)
        return Encoded(text=text, visual=visual, acoustic=acoustic, sequence=out, sequence_mask=layout.mask)

    def forward(
        self,
        batch: Batch,
        *,
        text_ids: Tensor | None = None,
        visual_masked: Tensor | None = None,
        acoustic_masked: Tensor | None = None,
        layout: PackedLayout | None = None,
        head: str | None = None,
        positions: Tensor | None = None,
    ) -> Encoded | Tensor:
        """Encode; with `head` (one of HEADS), return that head's output at `positions` [N, out].

        positions are flat indices into the head's modality [B * Lm] (pretrain.batch.flat_positions),
        so selecting needs no value from the device. text_ids replaces batch.text_ids (masked
        tokens); *_masked are bool [B, L*] frames to mask. Heads run inside forward so wrappers (DDP,
        DeepSpeed) see every parameter use.
        """
        enc = self.encode(batch, text_ids, visual_masked, acoustic_masked, layout)
        if head is None:
            return enc
        if head not in HEADS or positions is None:
            raise ValueError(f"head must be one of {list(HEADS)} and comes with `positions`; got {head!r}")
        h = at_positions(getattr(enc, HEADS[head]), positions)
        if head == "mlm":
            return self.cls(h)
        if head == "visual":
            return self.visual_head(h, self.visual_embed.proj.weight)
        if head == "acoustic":
            return self.acoustic_head(h, self.acoustic_embed.proj.weight)
        return self.fer_head(h)

    def borrowed_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module's forward reads a parameter that a child owns.

        ZeRO-3 gathers a parameter only around its owner's forward; train.py registers these with
        deepspeed.zero.register_external_parameter so they are whole when read here.
        """
        pairs: list[tuple[nn.Module, nn.Parameter]] = [(self, self.bert.embeddings.token_type_embeddings.weight)]
        if self.model_cfg.tie_frame_regression:
            pairs += [(self, self.visual_embed.proj.weight), (self, self.acoustic_embed.proj.weight)]
        pairs += [(embed, embed.position_embeddings.weight) for embed in (self.visual_embed, self.acoustic_embed)]
        return pairs

    def compile_layers(self) -> None:
        """torch.compile each encoder layer in place, torchtitan style: one graph serves every layer.

        Dynamic shapes, because length bucketing gives every batch its own sequence length: static
        graphs would recompile per length and fall back to eager past dynamo's recompile limit.
        Module.compile keeps parameter names, so checkpoints and exports are unchanged.
        """
        for layer in self.bert.encoder.layer:
            layer.compile(dynamic=True)

    # ---- accounting ---------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once); optionally without the lookup tables (word, position, type)."""
        total = sum(_numel(p) for p in self.parameters())
        if exclude_embeddings:
            emb = self.bert.embeddings
            tables = [emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings,
                      self.visual_embed.position_embeddings, self.acoustic_embed.position_embeddings]
            total -= sum(_numel(t.weight) for t in tables)
        return total

    def flops_per_token(self, seq_len: int = 128) -> float:
        """Training FLOPs per sequence position (forward + backward), nanoGPT/PaLM style: 6N + 12 * layers * hidden * seq_len.

        N leaves out the lookup tables, hence also the tied vocabulary projection, which runs only on
        the ~15% masked tokens of WWMLM steps; an estimate for MFU, not an exact count. The default
        seq_len is about a recipe sample (30 + 2 text, <= 36 visual, <= 64 acoustic); the attention
        term is ~3% of the total at BERT-base size.
        """
        c = self.config
        return 6 * self.num_params(exclude_embeddings=True) + 12 * c.num_hidden_layers * c.hidden_size * seq_len

    # ---- export -------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json (BertConfig + the ModelConfig under "memobert") and model.safetensors.

        The folder also loads as a plain text model: BertModel / BertForMaskedLM.from_pretrained(folder).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.to_diff_dict()
        config["architectures"] = ["BertForMaskedLM"]
        # The export is self-contained: reloading must not re-read the text BERT it started from.
        config["memobert"] = to_dict(dataclasses.replace(self.model_cfg, init_from=None))
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        # save_model drops the tied MLM decoder alias (safetensors refuses shared tensors); load_model re-ties.
        safetensors.torch.save_model(self, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return folder

    @classmethod
    def load_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "MEmoBERT":
        """Inverse of save_pretrained."""
        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        if "memobert" not in config:
            raise ValueError(f"{folder / CONFIG_NAME} has no 'memobert' section: not a MEmoBERT export")
        model_cfg = from_dict(ModelConfig, config.pop("memobert"))
        model = cls(BertConfig.from_dict(config), model_cfg)
        missing, unexpected = safetensors.torch.load_model(model, str(folder / WEIGHTS_NAME))
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match the config (missing {missing}, unexpected {unexpected})")
        return model.to(device)


def _bert_config(base: BertConfig, model_cfg: ModelConfig) -> BertConfig:
    """A copy of `base` with the recipe's dropout, the 3-row type vocabulary and SDPA attention."""
    config = BertConfig.from_dict(base.to_dict())
    config.type_vocab_size = model_cfg.type_vocab_size
    config.hidden_dropout_prob = model_cfg.dropout
    config.attention_probs_dropout_prob = model_cfg.dropout
    config._attn_implementation = "sdpa"
    return config


def _numel(param: Tensor) -> int:
    # ZeRO-3 empties each rank's parameter tensors and keeps the full size in ds_numel.
    return getattr(param, "ds_numel", param.numel())


def _shape(c: BertConfig) -> str:
    return f"{c.num_hidden_layers} x {c.hidden_size}, {c.num_attention_heads} heads, vocab {c.vocab_size}"
