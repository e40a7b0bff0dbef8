"""wav2vec 2.0 acoustic features: 16 kHz mono waves -> pooled hidden states (float16 [T_pooled, D]).

One interface, `Wav2Vec2Encoder`, over two backends:
- transformers: `Wav2Vec2Model` from a local HF folder (facebook/wav2vec2-base layout), never downloaded;
- fairseq2: a fairseq2 checkpoint or an original fairseq wav2vec2 .pt (fairseq's keys converted to fairseq2's by `_load_fairseq2_state`).
`AudioConfig.weights = None` builds a randomly initialised `arch` (tests and demo), deterministic by a seed.

Utterances are sorted by length and packed into padded batches. Padding must not leak into the features:
wav2vec2-base's first conv layer has a GroupNorm over time (zero padding would shift every frame of a
shorter utterance), so that GroupNorm is recomputed over each utterance's valid frames only; later convs
see only valid frames at valid positions, and the Transformer gets an attention mask. A batch's features
are therefore the same as one-at-a-time features, up to float rounding.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import pickle
from argparse import Namespace
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from preprocessing.config import AudioConfig

log = logging.getLogger(__name__)

ConvDescs = tuple[tuple[int, int, int], ...]  # (channels, kernel, stride) per feature-extractor conv
_W2V2_CONVS: ConvDescs = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclass(frozen=True)
class Wav2Vec2Shape:
    """The architecture numbers both backends need to build a wav2vec2 encoder."""

    dim: int
    layers: int
    heads: int
    ffn: int
    convs: ConvDescs = _W2V2_CONVS
    pos_kernel: int = 128
    pos_groups: int = 16
    conv_bias: bool = False
    layer_norm_convs: bool = False  # False: GroupNorm after the first conv only (wav2vec2-base "default" mode)
    pre_norm: bool = False  # pre-LN Transformer (large-lv60k); False: post-LN (base, large)


ARCHS: dict[str, Wav2Vec2Shape] = {
    # tests and demo: 2 layers, hidden 64, 32-channel convs with wav2vec2's strides (still 20 ms frames)
    "tiny": Wav2Vec2Shape(
        dim=64, layers=2, heads=4, ffn=128, convs=tuple((32, k, s) for _, k, s in _W2V2_CONVS), pos_kernel=16, pos_groups=4
    ),
    "base": Wav2Vec2Shape(dim=768, layers=12, heads=12, ffn=3072),
    "large": Wav2Vec2Shape(dim=1024, layers=24, heads=16, ffn=4096),
}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_audio(path: str | Path, sample_rate: int = 16_000) -> np.ndarray:
    """A file's audio as float32 mono at `sample_rate`: audio files through soundfile, anything else as a video
    through decord's bundled FFmpeg. Raises ValueError naming the file when there is no decodable audio."""
    from preprocessing.adapters import AUDIO_SUFFIXES

    if Path(path).suffix.lower() in AUDIO_SUFFIXES:
        import soundfile

        try:
            wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as err:
            raise ValueError(f"{path}: no decodable audio ({err})") from err
        wave = wave.mean(1)
        if rate != sample_rate:
            import torchaudio

            wave = torchaudio.functional.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
        return wave
    import decord

    try:
        return decord.AudioReader(str(path), sample_rate=sample_rate, mono=True)[:].asnumpy()[0].astype(np.float32)
    except (decord.DECORDError, RuntimeError, IndexError) as err:
        raise ValueError(f"{path}: no decodable audio stream ({err})") from err


def pool_frames(frames: Tensor, pool: int) -> Tensor:
    """Mean of each `pool` consecutive frames [T, D] -> [ceil(T / pool), D]; a trailing partial group averages what it has."""
    count, dim = frames.shape
    groups = -(-count // pool)
    padded = torch.cat([frames, frames.new_zeros(groups * pool - count, dim)])
    sizes = torch.full((groups, 1), float(pool), dtype=frames.dtype, device=frames.device)
    if groups:
        sizes[-1] = count - (groups - 1) * pool
    return padded.view(groups, pool, dim).sum(1) / sizes


def num_frames(samples: int, convs: ConvDescs) -> int:
    """Frames the conv feature extractor yields for `samples` input samples (0 when too short)."""
    for _, kernel, stride in convs:
        if samples < kernel:
            return 0
        samples = (samples - kernel) // stride + 1
    return samples


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state(module: nn.Module) -> str:
    """Hex sha256 of a module's tensors in key order (identifies randomly initialised weights)."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Backend(Protocol):
    """What `Wav2Vec2Encoder` needs from a backend: the conv feature extractor and a masked Transformer, both batched."""

    model: nn.Module
    shape: Wav2Vec2Shape
    normalize: bool  # zero-mean unit-variance waves, as the weights were trained
    weights_file: Path | None

    def cnn(self, waves: Tensor) -> Tensor:
        """Conv features [B, T, C] of zero-padded waves [B, S]."""
        ...

    def transformer(self, feats: Tensor, lens: list[int], layer: int) -> Tensor:
        """Hidden states [B, T, D] after `layer` (0 = Transformer input) for padded conv features [B, T, C]."""
        ...


class _TransformersBackend:
    def __init__(self, weights: str | None, arch: str) -> None:
        import json

        from transformers import Wav2Vec2Config, Wav2Vec2Model

        if weights is None:
            self.model = Wav2Vec2Model(hf_config(ARCHS[arch], Wav2Vec2Config))
            self.normalize, self.weights_file = False, None
        else:
            folder = Path(weights)
            self.model = Wav2Vec2Model.from_pretrained(folder, local_files_only=True)
            files = [folder / "model.safetensors", folder / "pytorch_model.bin"]
            self.weights_file = next((f for f in files if f.is_file()), None)
            prep = folder / "preprocessor_config.json"
            self.normalize = bool(json.loads(prep.read_text()).get("do_normalize", False)) if prep.is_file() else False
        c = self.model.config
        self.shape = Wav2Vec2Shape(
            dim=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads, ffn=c.intermediate_size,
            convs=tuple(zip(c.conv_dim, c.conv_kernel, c.conv_stride)),
        )

    def cnn(self, waves: Tensor) -> Tensor:
        return self.model.feature_extractor(waves).transpose(1, 2)

    def transformer(self, feats: Tensor, lens: list[int], layer: int) -> Tensor:
        mask = torch.arange(feats.shape[1], device=feats.device)[None] < torch.tensor(lens, device=feats.device)[:, None]
        hidden, _ = self.model.feature_projection(feats)
        last = layer == self.shape.layers
        out = self.model.encoder(hidden, attention_mask=mask, output_hidden_states=not last)
        return out.last_hidden_state if last else out.hidden_states[layer]


def hf_config(shape: Wav2Vec2Shape, config_cls: type) -> Any:
    """A transformers Wav2Vec2Config (`config_cls`) of `shape`."""
    channels, kernels, strides = zip(*shape.convs)
    return config_cls(
        hidden_size=shape.dim, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        intermediate_size=shape.ffn, conv_dim=channels, conv_kernel=kernels, conv_stride=strides,
        conv_bias=shape.conv_bias, num_conv_pos_embeddings=shape.pos_kernel,
        num_conv_pos_embedding_groups=shape.pos_groups,
        feat_extract_norm="layer" if shape.layer_norm_convs else "group", do_stable_layer_norm=shape.pre_norm,
    )


class _Fairseq2Backend:
    def __init__(self, weights: str | None, arch: str) -> None:
        import soundfile  # noqa: F401  (first: fairseq2n finds libsndfile through soundfile's bundled copy)
        from fairseq2.models.wav2vec2 import create_wav2vec2_model

        self.shape, self.normalize, self.weights_file = ARCHS[arch], False, None
        state = None
        if weights is not None:
            self.weights_file = Path(weights)
            state, cfg = _read_checkpoint(self.weights_file)
            model_cfg = _cfg_section(cfg, "model")
            if model_cfg:  # original fairseq: the file knows its architecture
                self.shape = _shape_from_fairseq(model_cfg, self.shape)
            self.normalize = bool(_cfg_section(cfg, "task").get("normalize", model_cfg.get("normalize", False)))
        config = _fs2_config(self.shape)
        self.model = create_wav2vec2_model(config)
        if state is not None:
            _load_fairseq2_state(self.model, state, config)

    def cnn(self, waves: Tensor) -> Tensor:
        from fairseq2.nn import BatchLayout

        return self.model.encoder_frontend.feature_extractor(waves, BatchLayout.of(waves))[0]

    def transformer(self, feats: Tensor, lens: list[int], layer: int) -> Tensor:
        from fairseq2.nn import BatchLayout

        frontend, encoder = self.model.encoder_frontend, self.model.encoder
        layout = BatchLayout.of(feats, lens)
        seqs, _ = frontend.process_features(frontend.post_extract_layer_norm(feats), layout, None)
        if layer == 0:
            return seqs
        if layer == self.shape.layers:
            return encoder(seqs, layout)
        captured: list[Tensor] = []

        def hook(idx: int, out: Tensor, _layout: Any, _n: int) -> bool:
            if idx == layer - 1:
                captured.append(out)
                return False  # stop: the later layers are not needed
            return True

        handle = encoder.register_layer_hook(hook)
        try:
            encoder(seqs, layout)
        finally:
            handle.remove()
        return captured[0]


def _fs2_config(shape: Wav2Vec2Shape) -> Any:
    from fairseq2.models.transformer import TransformerNormOrder
    from fairseq2.models.wav2vec2 import Wav2Vec2Config

    cfg = Wav2Vec2Config()
    enc = cfg.encoder_config
    enc.model_dim, enc.num_encoder_layers, enc.num_encoder_attn_heads = shape.dim, shape.layers, shape.heads
    enc.ffn_inner_dim, enc.feature_dim = shape.ffn, shape.convs[-1][0]
    enc.feature_extractor_layer_descs = list(shape.convs)
    enc.feature_extractor_bias, enc.feature_extractor_layer_norm_convs = shape.conv_bias, shape.layer_norm_convs
    enc.pos_conv_kernel_size, enc.num_pos_conv_groups = shape.pos_kernel, shape.pos_groups
    enc.norm_order = TransformerNormOrder.PRE if shape.pre_norm else TransformerNormOrder.POST
    enc.layer_norm_features = not shape.pre_norm  # fairseq's encoder.layer_norm moves to the frontend under post-LN
    return cfg


def _shape_from_fairseq(m: dict[str, Any], default: Wav2Vec2Shape) -> Wav2Vec2Shape:
    """Architecture from a fairseq checkpoint's cfg['model'] (or its old argparse `args`)."""
    fields = {
        "dim": "encoder_embed_dim", "layers": "encoder_layers", "heads": "encoder_attention_heads",
        "ffn": "encoder_ffn_embed_dim", "pos_kernel": "conv_pos", "pos_groups": "conv_pos_groups",
        "conv_bias": "conv_bias", "pre_norm": "layer_norm_first",
    }
    found = {name: m[key] for name, key in fields.items() if m.get(key) is not None}
    if m.get("conv_feature_layers"):
        found["convs"] = tuple(tuple(layer) for layer in _eval_list_expr(m["conv_feature_layers"]))
    if m.get("extractor_mode"):
        found["layer_norm_convs"] = m["extractor_mode"] == "layer_norm"
    return replace(default, **found)


def _eval_list_expr(expr: str) -> list[Any]:
    """Evaluate fairseq's conv spec (e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4") without eval()."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported conv_feature_layers expression: {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


class _LenientUnpickler(pickle.Unpickler):
    """Unpickles fairseq files without fairseq/omegaconf installed: unknown classes become inert stubs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": module})


class _Stub:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_lenient_pickle = Namespace(Unpickler=_LenientUnpickler, load=pickle.load, __name__="lenient_pickle")


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], Any]:
    """(state dict, cfg) of a fairseq2 checkpoint or an original fairseq .pt (which also pickles its cfg)."""
    try:
        # argparse.Namespace is what old fairseq files pickle as `args`; plain dicts need no allow-listing.
        with torch.serialization.safe_globals([Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        log.warning("%s pickles more than tensors and plain data (%s); loading it with weights_only=False: "
                    "only use checkpoints you trust", path, str(err).splitlines()[0])
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    cfg = ckpt.get("cfg") or ckpt.get("args") or {}
    state = ckpt.get("model", ckpt)
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}, cfg


def _cfg_section(cfg: Any, name: str) -> dict[str, Any]:
    """cfg['model'] / cfg['task'] of a fairseq cfg dict; an old argparse `args` is one flat namespace."""
    if isinstance(cfg, Namespace):
        return vars(cfg)
    section = cfg.get(name) if isinstance(cfg, dict) else None
    return dict(section) if isinstance(section, dict) else {}


def _load_fairseq2_state(model: nn.Module, state: dict[str, Tensor], config: Any) -> None:
    """Load the encoder weights of a fairseq2 or original-fairseq wav2vec2 checkpoint."""
    from fairseq2.models.wav2vec2 import convert_wav2vec2_state_dict

    state = dict(state)
    if "mask_emb" in state:  # original fairseq: fairseq2 only converts when it sees "mask_emb.weight"
        state["mask_emb.weight"] = state.pop("mask_emb")
        # Newer torch weight-norm naming -> the weight_g / weight_v pair fairseq2 expects.
        for old, new in (("parametrizations.weight.original0", "weight_g"), ("parametrizations.weight.original1", "weight_v")):
            for key in [k for k in state if k.startswith("encoder.pos_conv.0.") and k.endswith(old)]:
                state[key[: -len(old)] + new] = state.pop(key)
        state = convert_wav2vec2_state_dict(state, config)
        for key in [k for k in state if k.startswith("encoder.pos_conv.0.")]:
            state["encoder_frontend.pos_encoder.conv." + key[len("encoder.pos_conv.0."):]] = state.pop(key)
    else:
        state = convert_wav2vec2_state_dict(state, config)  # a fairseq2 checkpoint: only strips "module."
    # Only the encoder is used: the pretraining heads (quantizer, projections, mask embedding) stay as built.
    encoder_keys = ("encoder_frontend.", "encoder.")
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k.startswith(encoder_keys)}, strict=False)
    bad = [k for k in missing if k.startswith(encoder_keys)] + unexpected
    if bad:
        raise ValueError(f"wav2vec2 checkpoint does not match the encoder architecture; mismatched keys: {bad[:8]}")


class _MaskedGroupNorm:
    """Forward hook that redoes the conv extractor's GroupNorm (one group per channel, after the first conv)
    over each sequence's valid frames, so zero padding cannot shift the statistics; inactive outside `encode`."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        if norm.num_groups != norm.num_channels:
            raise ValueError(f"expected one GroupNorm group per channel, got {norm.num_groups} for {norm.num_channels}")
        self.valid: Tensor | None = None  # [B] valid frames of the batch being encoded
        norm.register_forward_hook(self)

    def __call__(self, norm: nn.GroupNorm, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if self.valid is None:
            return output
        x = inputs[0].float()
        mask = (torch.arange(x.shape[-1], device=x.device) < self.valid[:, None])[:, None]
        count = self.valid[:, None, None].float()
        mean = (x * mask).sum(-1, keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / count
        y = (x - mean) * torch.rsqrt(var + norm.eps)
        if norm.affine:
            y = y * norm.weight.float()[:, None] + norm.bias.float()[:, None]
        return y.to(output.dtype)


class Wav2Vec2Encoder:
    """Pooled wav2vec2 features for utterances, batched by length; float16 [ceil(frames / pool), dim] each."""

    def __init__(self, cfg: AudioConfig, seed: int = 0) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        # Half precision only where it is fast; CPU kernels in bf16/fp16 are slow and less tested.
        self.dtype = getattr(torch, cfg.dtype) if self.device.type == "cuda" else torch.float32
        backends: dict[str, Any] = {"transformers": _TransformersBackend, "fairseq2": _Fairseq2Backend}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random init (weights=None) is a function of the seed alone
            self.backend: _Backend = backends[cfg.backend](cfg.weights, cfg.arch)
        self.model = self.backend.model.eval().to(device=self.device, dtype=self.dtype)
        n = self.backend.shape.layers
        if not -(n + 1) <= cfg.layer <= n:
            raise ValueError(f"config key 'audio.layer': {cfg.layer} is outside -{n + 1}..{n} for a {n}-layer encoder")
        self.layer = cfg.layer % (n + 1)  # hidden state index: 0 = Transformer input, n = final layer
        norms = [m for m in self.model.modules() if isinstance(m, nn.GroupNorm)]
        if len(norms) > 1:  # wav2vec2 has at most one, after the first conv ("default" extractor mode)
            raise ValueError(f"unsupported wav2vec2 variant: {len(norms)} GroupNorm layers")
        self._group_norm = _MaskedGroupNorm(norms[0]) if norms else None
        self._seed = seed
        self._sha256: str | None = None

    @property
    def dim(self) -> int:
        """Feature width (768 for wav2vec2-base)."""
        return self.backend.shape.dim

    @property
    def name(self) -> str:
        """Extractor name for the manifest."""
        source = Path(self.cfg.weights).name if self.cfg.weights else f"random-{self.cfg.arch}-seed{self._seed}"
        return f"wav2vec2/{self.cfg.backend}/{source}/layer{self.layer}/pool{self.cfg.pool}"

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights file, or of the parameters of a randomly initialised model."""
        if self._sha256 is None:
            file = self.backend.weights_file
            self._sha256 = sha256_file(file) if file is not None else sha256_state(self.model)
        return self._sha256

    def frames(self, samples: int) -> int:
        """Pooled frames `encode` returns for a wave of `samples` samples."""
        return -(-num_frames(samples, self.backend.shape.convs) // self.cfg.pool)

    @torch.inference_mode()
    def encode(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """float32 16 kHz mono waves -> float16 [ceil(frames / pool), dim] each (frames every 20 ms).

        Each `pool` consecutive frames are averaged; a trailing partial group is averaged over the frames it
        has. Waves shorter than the 400-sample receptive field give [0, dim].
        """
        out = [np.zeros((0, self.dim), np.float16) for _ in waves]  # stays empty for waves shorter than one frame
        lengths = [len(w) for w in waves]
        convs = self.backend.shape.convs
        order = sorted((i for i, n in enumerate(lengths) if num_frames(n, convs) > 0), key=lambda i: lengths[i])
        budget = self.cfg.batch_seconds * self.cfg.sample_rate
        batch: list[int] = []
        for i in order:
            # Sorted ascending, so the batch's padded size is its count times this (longest) wave.
            if batch and (len(batch) + 1) * lengths[i] > budget:
                self._encode_batch(waves, batch, out)
                batch = []
            batch.append(i)
        if batch:
            self._encode_batch(waves, batch, out)
        return out

    def _encode_batch(self, waves: list[np.ndarray], index: list[int], out: list[np.ndarray]) -> None:
        """Encode waves[i] for i in `index` as one padded batch into out[i]."""
        lens = [len(waves[i]) for i in index]
        # Widths rounded up to 0.25 s: fewer distinct shapes for cuDNN's per-shape plans; padding is masked anyway.
        quantum = self.cfg.sample_rate // 4
        batch = torch.zeros(len(index), -(-max(lens) // quantum) * quantum, device=self.device)
        for row, i in enumerate(index):
            batch[row, : lens[row]] = self._prepare(waves[i])
        convs = self.backend.shape.convs
        if self._group_norm is not None:
            self._group_norm.valid = torch.tensor([num_frames(n, convs[:1]) for n in lens], device=self.device)
        try:
            feats = self.backend.cnn(batch.to(self.dtype))
        finally:
            if self._group_norm is not None:
                self._group_norm.valid = None
        frames = [num_frames(n, convs) for n in lens]
        hidden = self.backend.transformer(feats, frames, self.layer)
        pooled = [pool_frames(h[:n].float(), self.cfg.pool) for h, n in zip(hidden, frames)]
        flat = torch.cat(pooled).to(torch.float16).cpu().numpy()  # one device->host copy per batch
        for i, part in zip(index, np.split(flat, np.cumsum([len(p) for p in pooled])[:-1])):
            out[i] = part

    def _prepare(self, wave: np.ndarray) -> Tensor:
        if wave.ndim != 1:
            raise ValueError(f"expected a mono wave [samples], got shape {wave.shape}")
        # A copy: arrays from Ray's object store are read-only, which torch warns about.
        x = torch.as_tensor(np.array(wave, dtype=np.float32), device=self.device)
        if self.backend.normalize:
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)  # as HF's feature extractor does
        return x
