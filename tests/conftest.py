"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
