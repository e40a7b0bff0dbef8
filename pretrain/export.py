"""`memobert export`: a DeepSpeed checkpoint -> a self-contained model folder finetuning loads in one call.

The folder holds config.json + model.safetensors (MEmoBERT.save_pretrained), the tokenizer's
vocab.txt, and features.json (the feature extractors and settings from the shards' manifest), so
downstream data can be checked against what the model was pretrained on.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig

from memobert.config import from_dict
from memobert.shard_store import folder_manifest
from pretrain.config import PretrainConfig
from pretrain.model import CONFIG_NAME, MEmoBERT
from pretrain.vocab import vocab_folder

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
FEATURES_NAME = "features.json"


def find_checkpoint(path: Path) -> Path:
    """The step folder of `path`: a step_N folder, a checkpoints/ folder (its latest) or a run folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / TRAINER_STATE).is_file():
            return candidate
        latest = candidate / "latest"
        if latest.is_file():
            return candidate / latest.read_text().strip()
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint here (expected step_N/{TRAINER_STATE} or a 'latest' file)")


def load_checkpoint_model(path: Path) -> tuple[MEmoBERT, dict[str, Any]]:
    """The model of a DeepSpeed checkpoint in fp32, and the trainer state saved beside it.

    ZeRO 1-3 checkpoints hold fp32 master weights, and those are read. ZeRO-0 keeps the module's own
    weights, so a bf16 run exports its bf16-rounded copy (a warning says so).
    """
    step_dir = find_checkpoint(path)
    state = json.loads((step_dir / TRAINER_STATE).read_text())
    cfg = from_dict(PretrainConfig, state["config"])
    model = MEmoBERT(BertConfig.from_dict(state["bert_config"]), cfg.model)
    if cfg.train.zero_stage == 0:
        # No partitions: the module's weights are whole in the model-states file.
        weights = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        if any(w.dtype == torch.bfloat16 for w in weights.values()):
            log.warning("%s: a ZeRO-0 bf16 checkpoint holds only bf16 weights; exporting them as they are "
                        "(ZeRO 1-3 keep fp32 master weights)", step_dir)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    _check_complete(model, weights, step_dir)
    return model, state


def export(checkpoint: Path, out: Path) -> Path:
    """Write the self-contained folder for `checkpoint` to `out`."""
    from preprocessing.text import default_vocab_folder

    model, state = load_checkpoint_model(checkpoint)
    cfg = from_dict(PretrainConfig, state["config"])
    out = Path(out)
    model.save_pretrained(out)
    vocab = vocab_folder(cfg)
    vocab_folder_path = Path(vocab or default_vocab_folder())
    shutil.copy(vocab_folder_path / "vocab.txt", out / "vocab.txt")
    features = _manifest_summary(cfg.data.train_shards)
    features["pretrained"] = {"step": state["step"], "config": state["config"]}
    (out / FEATURES_NAME).write_text(json.dumps(features, indent=2, sort_keys=True))
    return out


def load_model(path: Path) -> MEmoBERT:
    """An exported folder or a DeepSpeed checkpoint folder, as one MEmoBERT (the finetuning entry point)."""
    path = Path(path)
    config = path / CONFIG_NAME
    if config.is_file() and "memobert" in json.loads(config.read_text()):
        return MEmoBERT.load_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        return MEmoBERT.load_pretrained(export(path, Path(tmp) / "model"))


def _check_complete(model: MEmoBERT, weights: dict[str, torch.Tensor], where: Path) -> None:
    # The tied MLM decoder may be absent from a checkpoint; every other parameter must come from it.
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    missing = sorted(set(model.state_dict()) - set(weights) - tied)
    if missing:
        raise ValueError(f"{where}: checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")


def _manifest_summary(shards: str) -> dict[str, Any]:
    manifest = folder_manifest(shards) if shards else None
    if manifest is None:
        return {"manifest": None}
    data = asdict(manifest)
    return {key: data.get(key) for key in ("dims", "extractors", "settings", "schema_version")}
