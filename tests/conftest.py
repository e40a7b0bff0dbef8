"""Shared fixtures."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import slurm_local


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic corpus (seed 0), generated once per test session and shared by every stage's tests."""
    from preprocessing.synth import SynthConfig, generate_corpus

    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate_corpus(out, SynthConfig(seed=0, scale="tiny"))
    return out


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[slurm_local.LocalSlurm]:
    """A private single-node Slurm cluster (own munged, slurmctld, slurmd) for the session; skips without Slurm."""
    missing = slurm_local.missing_binaries()
    if missing:
        pytest.skip(f"Slurm / munge not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the private Slurm cluster runs its daemons as root")
    cluster = slurm_local.start(tmp_path_factory.mktemp("slurm"))
    os.environ.update(cluster.env)  # sbatch / srun / squeue here and in every child process find this cluster
    try:
        yield cluster
    finally:
        cluster.stop()
        for key in cluster.env:
            os.environ.pop(key, None)


@pytest.fixture(autouse=True)
def seeded_global_rngs() -> None:
    """Every test starts from the same global torch / numpy / random state, whatever ran before it: model
    initialisation and dropout draw from torch's global RNG, so without this a test's numbers depend on the order."""
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op torch thread in the test process: on 2 shared cores, OpenMP oversubscription
    stalled tiny models 10-100x. Subprocess tests (training runs) are not affected."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def labeled_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 utterances per speaker of IEMOCAP sessions 1-5 (4 per class) with a learnable class signal."""
    from finetune.protocols import iemocap_folds
    from helpers import write_tiny_shards

    speakers = [speaker for fold in iemocap_folds()[::2] for speaker in (fold.test, fold.val)]
    return write_tiny_shards(tmp_path_factory.mktemp("labeled") / "shards", 160, 4, seed=0, speakers=speakers,
                             class_signal=3.0)

