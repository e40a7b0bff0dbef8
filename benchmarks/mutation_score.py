"""Per-file mutation scores from mutmut's results in mutants/, and the `make mutation` summary line.

`--globs` prints the mutant names `mutmut run` should test (the scope below); without it, the script
reads mutants/<file>.meta and prints each file's killed / total, the survivors, then
`mutation score: K/N killed (P%)`. A timeout counts as killed (the mutant hung the tests).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

# File -> the mutants in scope: whole modules, and of finetune/run.py only the training / selection loop.
SCOPE = {
    "pretrain/tasks.py": "pretrain.tasks.*",
    "pretrain/masking.py": "pretrain.masking.*",
    "pretrain/batch.py": "pretrain.batch.*",
    "finetune/metrics.py": "finetune.metrics.*",
    "finetune/protocols.py": "finetune.protocols.*",
    "finetune/prompt.py": "finetune.prompt.*",
    "finetune/run.py": "finetune.run.x_train_and_select__mutmut_*",
}
KILLED = {"killed", "timeout"}


def file_results(root: Path, path: str, pattern: str) -> dict[str, str]:
    """{mutant name: status} of the mutants of `path` in scope."""
    meta = root / f"{path}.meta"
    if not meta.is_file():
        raise SystemExit(f"{meta}: no mutmut results (run `make mutation`)")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items() if fnmatch.fnmatch(name, pattern)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--globs", action="store_true", help="print the mutant names in scope for `mutmut run`")
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's work folder")
    args = parser.parse_args()
    if args.globs:
        print(" ".join(SCOPE.values()))
        return 0
    total_killed = total = 0
    survivors = []
    for path, pattern in SCOPE.items():
        results = file_results(args.mutants, path, pattern)
        killed = sum(status in KILLED for status in results.values())
        timeouts = sum(status == "timeout" for status in results.values())
        survivors += [f"  {name}: {status}" for name, status in sorted(results.items()) if status not in KILLED]
        print(f"{path:24s} {killed:4d}/{len(results):<4d} killed ({100 * killed / max(len(results), 1):.1f}%)"
              + (f", {timeouts} of them by timeout" if timeouts else ""))
        total_killed, total = total_killed + killed, total + len(results)
    if survivors:
        print("not killed (`mutmut show NAME` prints the change):", *survivors, sep="\n")
    print(f"mutation score: {total_killed}/{total} killed ({100 * total_killed / max(total, 1):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
