"""wav2vec2 features: both backends load weights in their real on-disk formats; pooling and batching are exact."""

from __future__ import annotations

import re
import sys
import types
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing.audio_encoder import ARCHS, Wav2Vec2Encoder, num_frames, pool_frames, sha256_file
from preprocessing.config import AudioConfig

LENGTHS = (16000, 7000, 12345, 3200, 200)  # the last is shorter than the 400-sample receptive field



@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in LENGTHS]


def tiny(backend: str, weights: str | None = None, seed: int = 0, **kw: object) -> Wav2Vec2Encoder:
    return Wav2Vec2Encoder(AudioConfig(backend=backend, weights=weights, arch="tiny", device="cpu", **kw), seed=seed)  # type: ignore[arg-type]


def assert_same(a: list[np.ndarray], b: list[np.ndarray], atol: float = 2e-3) -> None:
    assert [x.shape for x in a] == [y.shape for y in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=atol)


def check_features(out: list[np.ndarray], dim: int) -> None:
    for feats, n in zip(out, LENGTHS):
        assert feats.dtype == np.float16 and np.isfinite(feats).all()
        assert feats.shape == (-(-num_frames(n, ARCHS["tiny"].convs) // 3), dim)
    assert out[0].shape[0] == 17 and out[-1].shape[0] == 0  # 1 s = 49 frames of 20 ms -> ceil(49/3)


def test_pooling_arithmetic_is_exact() -> None:
    frames = torch.arange(14.0).view(7, 2)  # rows (0,1) (2,3) ... (12,13)
    pooled = pool_frames(frames, 3)
    assert pooled.tolist() == [[2.0, 3.0], [8.0, 9.0], [12.0, 13.0]]  # the trailing single frame is its own mean
    assert pool_frames(frames[:6], 3).tolist() == [[2.0, 3.0], [8.0, 9.0]]
    assert pool_frames(frames[:0], 3).shape == (0, 2)
    assert num_frames(16000, ARCHS["base"].convs) == 49 and num_frames(399, ARCHS["base"].convs) == 0


@pytest.mark.parametrize("backend", ["transformers", "fairseq2"])
def test_encoder_pools_frames_and_batches_exactly(backend: str, waves: list[np.ndarray]) -> None:
    enc = tiny(backend, batch_seconds=1.6)  # several batches, with padding inside each
    batched = enc.encode(waves)
    check_features(batched, 64)
    assert_same(batched, [enc.encode([w])[0] for w in waves])  # batching by length changes nothing
    frames = tiny(backend, pool=1).encode(waves)
    hand = [pool_frames(torch.from_numpy(f.astype(np.float32)), 3).numpy() for f in frames]
    assert_same(batched, [h.astype(np.float16) for h in hand])
    assert enc.frames(16000) == 17 and enc.encode([]) == []
    first = tiny(backend, layer=1).encode(waves[:1])[0]
    assert not np.allclose(first, batched[0], atol=1e-2)  # layer selection reaches the model
    assert_same(tiny(backend, layer=2).encode(waves[:1]), batched[:1], atol=0)  # -1 is the last of 2 layers
    with pytest.raises(ValueError, match="audio.layer"):
        tiny(backend, layer=3)


def library_forward(enc: Wav2Vec2Encoder, wave: np.ndarray) -> np.ndarray:
    """Final-layer states of one unpadded wave through the backend library's own forward, pooled by 3."""
    x = torch.from_numpy(wave)[None]
    with torch.inference_mode():
        if enc.cfg.backend == "transformers":
            h = enc.model(x).last_hidden_state[0]
        else:
            from fairseq2.nn import BatchLayout

            seqs, layout, _ = enc.model.encoder_frontend.extract_features(x, BatchLayout.of(x))
            seqs, _ = enc.model.encoder_frontend.process_features(seqs, layout, None)
            h = enc.model.encoder(seqs, layout)[0]
    return pool_frames(h, 3).numpy().astype(np.float16)


@pytest.mark.parametrize("backend", ["transformers", "fairseq2"])
def test_batches_match_the_libraries_own_unpadded_forward(backend: str, waves: list[np.ndarray]) -> None:
    enc = tiny(backend, batch_seconds=4.0)  # one padded batch of all waves
    assert_same(enc.encode(waves)[:-1], [library_forward(enc, w) for w in waves[:-1]])


@pytest.mark.parametrize("layout", ["base-model", "pretraining"])
def test_transformers_loads_a_save_pretrained_folder(tmp_path: Path, waves: list[np.ndarray], layout: str) -> None:
    from transformers import Wav2Vec2ForPreTraining

    source = tiny("transformers", seed=3)
    folder = tmp_path / "w2v"
    if layout == "pretraining":  # facebook/wav2vec2-base's layout: "wav2vec2."-prefixed keys, a preprocessor config
        full = Wav2Vec2ForPreTraining(source.model.config)
        full.wav2vec2.load_state_dict(source.model.state_dict())
        full.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text('{"do_normalize": true, "return_attention_mask": false}')
        expected = source.encode([(w - w.mean()) / np.sqrt(w.var() + 1e-7) for w in waves])
    else:
        source.model.save_pretrained(folder)
        expected = source.encode(waves)
    loaded = Wav2Vec2Encoder(AudioConfig(backend="transformers", weights=str(folder), device="cpu"))
    out = loaded.encode(waves)
    check_features(out, 64)
    assert_same(out, expected, atol=1e-3)
    assert loaded.weights_sha256 == sha256_file(folder / "model.safetensors")
    assert loaded.weights_sha256 != tiny("transformers", seed=4).weights_sha256


# fairseq2 name -> original fairseq name (the inverse of fairseq2's convert_wav2vec2_state_dict plus
# the renames it misses); the quantizer's update counter does not exist in fairseq.
FS2_TO_FAIRSEQ = [
    (r"^encoder_frontend\.feature_extractor\.layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"^encoder_frontend\.feature_extractor\.layers\.0\.group_norm\.", "feature_extractor.conv_layers.0.2."),
    (r"^encoder_frontend\.post_extract_layer_norm\.", "layer_norm."),
    (r"^encoder_frontend\.model_dim_proj\.", "post_extract_proj."),
    (r"^encoder_frontend\.pos_encoder\.conv\.", "encoder.pos_conv.0."),
    (r"^encoder_frontend\.layer_norm\.", "encoder.layer_norm."),
    (r"\.self_attn\.output_proj\.", ".self_attn.out_proj."),
    (r"\.ffn\.inner_proj\.", ".fc1."),
    (r"\.ffn\.output_proj\.", ".fc2."),
    (r"\.ffn_layer_norm\.", ".final_layer_norm."),
    (r"^masker\.temporal_mask_embed$", "mask_emb"),
    (r"^quantizer\.entries$", "quantizer.vars"),
    (r"^quantizer\.entry_proj\.", "quantizer.weight_proj."),
    (r"^final_target_proj\.", "project_q."),
]

TINY_FAIRSEQ_MODEL_CFG = {
    "_name": "wav2vec2", "extractor_mode": "default", "encoder_layers": 2, "encoder_embed_dim": 64,
    "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 4, "activation_fn": "gelu", "layer_norm_first": False,
    "conv_feature_layers": "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] + [(32, 2, 2)]",
    "conv_bias": False, "conv_pos": 16, "conv_pos_groups": 4, "final_dim": 16, "latent_vars": 8, "latent_groups": 2,
}


def fairseq_state(encoder: Wav2Vec2Encoder, parametrized_weight_norm: bool) -> dict[str, torch.Tensor]:
    """The encoder's fairseq2 weights under original-fairseq key names."""
    out = {}
    for key, tensor in encoder.model.state_dict().items():
        if key == "quantizer.num_updates":
            continue
        for pattern, repl in FS2_TO_FAIRSEQ:
            key = re.sub(pattern, repl, key)
        if parametrized_weight_norm:  # torch.nn.utils.parametrizations.weight_norm naming (newer fairseq)
            key = key.replace("pos_conv.0.weight_g", "pos_conv.0.parametrizations.weight.original0")
            key = key.replace("pos_conv.0.weight_v", "pos_conv.0.parametrizations.weight.original1")
        out[key] = tensor.clone()
    return out


@pytest.mark.parametrize("variant", ["cfg-dict", "args-namespace"])
def test_fairseq2_loads_original_fairseq_checkpoint(tmp_path: Path, waves: list[np.ndarray], variant: str) -> None:
    source = tiny("fairseq2", seed=5)
    state = fairseq_state(source, parametrized_weight_norm=variant == "args-namespace")
    for key in ("mask_emb", "feature_extractor.conv_layers.0.0.weight", "feature_extractor.conv_layers.0.2.weight",
                "post_extract_proj.weight", "encoder.layers.1.self_attn.k_proj.weight", "encoder.layers.0.fc1.bias",
                "quantizer.vars", "project_q.weight", "final_proj.weight", "encoder.layer_norm.weight"):
        assert key in state
    if variant == "cfg-dict":  # fairseq >= 0.10 pickles its config as plain containers
        ckpt = {"cfg": {"model": TINY_FAIRSEQ_MODEL_CFG, "task": {"_name": "audio_pretraining", "normalize": False}}}
    else:  # older fairseq pickles an argparse.Namespace
        ckpt = {"args": Namespace(**TINY_FAIRSEQ_MODEL_CFG, normalize=False), "cfg": None}
    ckpt |= {"model": state, "optimizer_history": [{"num_updates": 400000}], "extra_state": {}}
    torch.save(ckpt, tmp_path / "wav2vec_small.pt")
    # arch="base" on purpose: the architecture must come from the checkpoint's own cfg.
    loaded = Wav2Vec2Encoder(AudioConfig(backend="fairseq2", weights=str(tmp_path / "wav2vec_small.pt"), arch="base", device="cpu"))
    out = loaded.encode(waves)
    check_features(out, 64)
    assert_same(out, source.encode(waves), atol=0)
    assert loaded.weights_sha256 == sha256_file(tmp_path / "wav2vec_small.pt")


def test_fairseq2_loads_native_checkpoint_and_unreadable_cfg(tmp_path: Path, waves: list[np.ndarray], caplog) -> None:
    source = tiny("fairseq2", seed=6)
    expected = source.encode(waves[:2])
    torch.save({"model": source.model.state_dict()}, tmp_path / "fs2.pt")
    assert_same(tiny("fairseq2", weights=str(tmp_path / "fs2.pt")).encode(waves[:2]), expected, atol=0)

    # A cfg object of a package that is not installed (e.g. omegaconf's DictConfig): loaded leniently, arch used.
    fake = types.ModuleType("not_installed_cfg")
    fake.DictConfig = type("DictConfig", (), {"__module__": "not_installed_cfg"})  # type: ignore[attr-defined]
    sys.modules["not_installed_cfg"] = fake
    try:
        torch.save({"cfg": fake.DictConfig(), "model": fairseq_state(source, False)}, tmp_path / "odd.pt")
    finally:
        del sys.modules["not_installed_cfg"]
    out = tiny("fairseq2", weights=str(tmp_path / "odd.pt")).encode(waves[:2])
    assert_same(out, expected, atol=0)
    assert "weights_only=False" in caplog.text

    wrong = dict(fairseq_state(source, False))
    wrong["encoder.layers.0.fc1.weight"] = torch.zeros(3, 3)
    torch.save({"model": wrong}, tmp_path / "bad.pt")
    with pytest.raises((ValueError, RuntimeError)):
        tiny("fairseq2", weights=str(tmp_path / "bad.pt"))


# transformers name -> original fairseq name (as transformers' own fairseq conversion script pairs them).
HF_TO_FAIRSEQ = [
    (r"^feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"^feature_extractor\.conv_layers\.0\.layer_norm\.", "feature_extractor.conv_layers.0.2."),
    (r"^feature_projection\.layer_norm\.", "layer_norm."),
    (r"^feature_projection\.projection\.", "post_extract_proj."),
    (r"^encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0$", "encoder.pos_conv.0.weight_g"),
    (r"^encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1$", "encoder.pos_conv.0.weight_v"),
    (r"^encoder\.pos_conv_embed\.conv\.bias$", "encoder.pos_conv.0.bias"),
    (r"\.attention\.", ".self_attn."),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"\.feed_forward\.intermediate_dense\.", ".fc1."),
    (r"\.feed_forward\.output_dense\.", ".fc2."),
    (r"^masked_spec_embed$", "mask_emb"),
]


def test_both_backends_compute_the_same_features(tmp_path: Path, waves: list[np.ndarray]) -> None:
    hf = tiny("transformers", seed=7)
    state = {}
    for key, tensor in hf.model.state_dict().items():
        for pattern, repl in HF_TO_FAIRSEQ:
            key = re.sub(pattern, repl, key)
        state[key] = tensor.clone()
    torch.save({"cfg": {"model": TINY_FAIRSEQ_MODEL_CFG, "task": {}}, "model": state}, tmp_path / "from_hf.pt")
    fs2 = tiny("fairseq2", weights=str(tmp_path / "from_hf.pt"))
    assert_same(fs2.encode(waves), hf.encode(waves), atol=3e-3)
