"""Atomic output writing and safe loading.

Every output slsd writes goes through here: written to a temporary file in the same directory, then
renamed over the target, so a crash never leaves a half-written file. An existing output is only
replaced with `force=True` (the CLI's `--force`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from slsd_cli.errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used, so light commands start fast
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite an existing output unless forced; create the parent directory."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError("output exists; pass --force to overwrite it", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as handle:  # make the bytes durable before the rename makes them visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a json file; a missing or malformed file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"malformed json ({exc})", path=path) from exc


def read_jsonl(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"malformed json line ({exc})", path=path, record=f"line {line_number}") from exc


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch_file(path: str | Path, map_location: "str | torch.device" = "cpu") -> Any:
    """Load a checkpoint without executing code (`weights_only=True`)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", path=path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise InputError(f"unreadable checkpoint ({type(exc).__name__}: {exc})", path=path) from exc


def save_safetensors_atomic(tensors: "dict[str, torch.Tensor]", path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_safetensors(path: str | Path) -> "tuple[dict[str, torch.Tensor], dict[str, str]]":
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise InputError(f"not a readable safetensors file ({exc})", path=path) from exc
    return tensors, metadata
