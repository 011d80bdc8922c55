"""The mutation-testing sample of docs/testing.md, and its per-file survival rates (support code for
mutmut; no tests here).

    python -m tests.helpers.mutation_sample names [K [FILE ...]]   # K mutants per mutated file (default 5)
    python -m tests.helpers.mutation_sample report [K [FILE ...]]  # killed / survived per file, for that sample

FILE (e.g. model/cascade.py) keeps the files whose path contains it: the sample of what you changed.

Run from the folder holding `mutants/` (what `mutmut run` generated). The sample is reproducible:
the K mutants of each file are evenly spaced over the file's mutant names in sorted order (so they
spread over its functions), the same for the same source whoever runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# mutmut's exit codes (mutmut/stats.py): 1 and 3 killed, 0 survived, 5 and 33 no test covers the
# mutated function (counted as survived here: nothing would notice the bug), 24/36/152/255 timeout
KILLED, SURVIVED, TIMEOUT = {1, 3}, {0, 5, 33}, {24, -24, 36, 152, 255}


def _metas(root: Path) -> dict[str, dict]:
    """{source file: its mutmut metadata}, for every mutated file that has mutants."""
    out = {}
    for meta in sorted((root / "slsd_cli").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        if data["exit_code_by_key"]:
            out[str(meta.relative_to(root))[:-len(".meta")]] = data
    return out


def sample(root: Path, per_file: int, files: list[str] | None = None) -> dict[str, list[str]]:
    """{source file: its sampled mutant names}, for the files whose path contains one of `files`
    (all when None or empty)."""
    picked = {}
    for source, data in _metas(root).items():
        if files and not any(f in source for f in files):
            continue
        names = sorted(data["exit_code_by_key"])
        step = len(names) / min(per_file, len(names))
        picked[source] = [names[int((i + 0.5) * step)] for i in range(min(per_file, len(names)))]
    return picked


def report(root: Path, per_file: int, files: list[str] | None = None) -> str:
    """A markdown table: per file, killed / survived / not yet run among the sampled mutants."""
    metas = _metas(root)
    lines = ["| file | sampled | killed | survived | survival | not run |", "|---|---|---|---|---|---|"]
    totals = [0, 0, 0, 0]
    for source, names in sample(root, per_file, files).items():
        codes = [metas[source]["exit_code_by_key"][n] for n in names]
        killed = sum(c in KILLED or c in TIMEOUT for c in codes)
        survived = sum(c in SURVIVED for c in codes)
        pending = sum(c is None for c in codes)
        rate = f"{survived / (killed + survived):.0%}" if killed + survived else "-"
        lines.append(f"| {source} | {len(names)} | {killed} | {survived} | {rate} | {pending} |")
        for i, v in enumerate((len(names), killed, survived, pending)):
            totals[i] += v
    rate = f"{totals[2] / (totals[1] + totals[2]):.0%}" if totals[1] + totals[2] else "-"
    lines.append(f"| all | {totals[0]} | {totals[1]} | {totals[2]} | {rate} | {totals[3]} |")
    survivors = [n for s, names in sample(root, per_file, files).items() for n in names
                 if metas[s]["exit_code_by_key"][n] in SURVIVED]
    return "\n".join(lines + ["", "survivors: " + (" ".join(survivors) or "none")])


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "names"
    per_file = int(argv[1]) if len(argv) > 1 else 5
    files = argv[2:]
    root = Path("mutants")
    if not root.is_dir():
        print("no mutants/ here: run `mutmut run` once first (it generates them)", file=sys.stderr)
        return 2
    if command == "names":
        print(" ".join(n for names in sample(root, per_file, files).values() for n in names))
    else:
        print(report(root, per_file, files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
