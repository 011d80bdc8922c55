"""Resumable checkpoints: written atomically, loaded with `weights_only=True`.

`RUN/ckpt/last.pt` is one torch file holding plain types and tensors only:

    {"format": 1, "iteration": int,             # iterations completed
     "world_size": int, "recipe": dict,
     "modules": {name: state_dict},             # the phase's modules (model, or student + teacher)
     "optimizer": state_dict, "scaler": state_dict | None,
     "phase": dict,                             # the phase's own state (data position, ...)
     "trainer": {"skipped": int, "consecutive_nonfinite": int, "elapsed": float,
                 "eval": {"best": float | None, "best_iter": int | None}},
     "rng": [per-rank {"torch", "cuda", "numpy", "python"}]}

It is written to a temporary file in the same folder, flushed to disk and renamed onto `last.pt`,
so a process killed mid-write leaves the previous checkpoint intact (and a stray `.last.pt.*.tmp`,
which `remove_stale_temps` deletes on the next start). With `train.keep_last N` each checkpoint is
also kept as `RUN/ckpt/iter_<iteration, 7 digits>.pt` (`keep_copy`: a hard link, no second write), the last N of them.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slsd_cli.io import load_torch_file, torch_save_atomic

FORMAT = 1


def save(state: dict[str, Any], path: str | Path) -> None:
    torch_save_atomic({"format": FORMAT, **state}, path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    from slsd_cli.errors import InputError

    state = load_torch_file(path, map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT or "modules" not in state:
        raise InputError("not an slsd training checkpoint", path=path)
    return state


def keep_copy(path: str | Path, copy: str | Path) -> None:
    """Keep checkpoint `path` also as `copy`, atomically: a hard link where the file system has them
    (the next save renames a new file onto `path`, so the copy keeps this checkpoint's bytes)."""
    path, copy = Path(path), Path(copy)
    tmp = copy.with_name(f".{copy.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, copy)


def remove_stale_temps(path: str | Path) -> int:
    """Delete temporary files left in `path`'s folder by a writer that died before its rename;
    returns how many."""
    path = Path(path)
    count = 0
    if path.parent.is_dir():
        for tmp in path.parent.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            count += 1
    return count


# ------------------------------------------------------------------------------ RNG states


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states as tensors and plain lists."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [int(py_version), [int(v) for v in py_internal], py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
