"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic corpus (seed 0), generated once per test session and shared by every stage's tests."""
    from preprocessing.synth import SynthConfig, generate_corpus

    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate_corpus(out, SynthConfig(seed=0, scale="tiny"))
    return out
