"""Tensors on disk: `torch.save` written atomically, `torch.load` with `weights_only=True` only
(a pickle that would build objects is named as such, never run), and safetensors (the shareable
weights) with sorted, deterministic headers.

Every tensor a torch file yields is checked against the storage the file gave it
(`check_tensor_layout`): a view whose shape and strides reach beyond its storage, or that holds
more elements than its storage (stride 0: a 4-byte file can describe a 10^6 x 10^6 tensor), is
refused in one line naming the file and the tensor, before anything copies it. safetensors has no
strides, and its reader refuses a header whose shape and dtype disagree with the bytes given.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from slsd_cli.errors import InputError
from slsd_cli.io.files import atomic_path

if TYPE_CHECKING:  # torch is imported where it is used, so light commands start fast
    import torch


def json_metadata(metadata: dict[str, str], key: str, path: str | Path) -> Any:
    """Parse one json-valued entry of a safetensors header's metadata (None when absent); a corrupt
    value is an InputError naming the file and the key."""
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except (json.JSONDecodeError, TypeError) as exc:
        raise InputError(f"metadata entry {key!r} is not valid json ({exc})", path=path) from exc


class _RecordingWriter:
    """A file wrapper for torch.save that keeps the OSError torch would bury in an 'enforce fail'."""

    def __init__(self, handle: Any):
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        writer = _RecordingWriter(handle)
        try:
            torch.save(obj, writer)
        except RuntimeError as exc:  # torch reports a failed write as "[enforce fail ...] unexpected pos"
            if writer.error is not None:
                raise writer.error from None
            raise


# the words torch uses when weights_only=True refuses a pickle (its advice that follows is not ours)
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


def load_torch_file(path: str | Path, map_location: "str | torch.device" = "cpu") -> Any:
    """Load a checkpoint without executing code (`weights_only=True`)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", path=path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to the one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if _WEIGHTS_ONLY_REFUSAL in str(exc) and _builds_objects(path):
            raise InputError("holds objects other than tensors and plain containers; not loaded "
                             "(slsd never runs code from a checkpoint)", path=path) from None
        raise InputError("unreadable checkpoint (not a torch checkpoint, or damaged)", path=path) from None
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise InputError(f"unreadable checkpoint ({type(exc).__name__}: {_first_line(exc)})", path=path) from None
    for name, tensor in _tensors_in(obj):
        check_tensor_layout(tensor, name, path)
    return obj


def _tensors_in(obj: Any, prefix: str = "") -> "Iterator[tuple[str, torch.Tensor]]":
    """Every tensor inside nested dicts / lists / tuples, with its path ('model.backbone.w', 'state.0')."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix or "<tensor>", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors_in(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors_in(value, f"{prefix}.{i}" if prefix else str(i))


def check_tensor_layout(tensor: "torch.Tensor", name: str, path: str | Path) -> None:
    """Refuse a tensor whose shape and strides do not fit the storage it was read with: its last
    element past the storage's end, or more elements than the storage holds (a stride-0 or
    overlapping view, which `.contiguous()` would blow up to shape-product bytes)."""
    if tensor.is_meta or tensor.numel() == 0:
        return
    size = tensor.element_size()
    capacity = tensor.untyped_storage().nbytes() // size - tensor.storage_offset()
    reach = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
    if reach > capacity or tensor.numel() > capacity:
        raise InputError(f"tensor {name!r} of shape {tuple(tensor.shape)} (strides {tuple(tensor.stride())}) "
                         f"does not fit its stored {capacity} elements: a broadcast or overlapping view, not "
                         "weights (re-save it with .contiguous())", path=path)


# pickle opcodes that import or call something: what weights_only refuses in a well-formed pickle
_OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _builds_objects(path: Path, limit: int = 1 << 26) -> bool:
    """Whether a file torch refused is a well-formed pickle (or torch zip) that imports or builds
    objects, as opposed to a damaged or foreign file. Only parses opcodes (`pickletools`), never
    runs them."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                data = archive.read(name)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit)
        return any(op.name in _OBJECT_OPCODES for op, _, _ in pickletools.genops(data))
    except Exception:  # not a pickle at all
        return False


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec)
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def save_safetensors_atomic(tensors: "dict[str, torch.Tensor]", path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Write tensors and string metadata atomically in the safetensors format.

    Written here rather than by `safetensors.save_file`, whose header keeps metadata in a hash map
    of random order: our header lists metadata and tensors sorted by name (tensor data in the same
    order), so the same tensors and metadata always give the same bytes."""
    import struct

    import torch

    names = sorted(tensors)
    flat = []
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(key): str(metadata[key]) for key in sorted(metadata)}
    offset = 0
    for name in names:
        tensor = tensors[name].detach().to("cpu").contiguous()
        dtype = _SAFETENSORS_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise TypeError(f"safetensors cannot store {tensor.dtype} (tensor {name})")
        data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        flat.append(data)
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for data in flat:
            handle.write(memoryview(data) if not isinstance(data, bytes) else data)


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
        raise InputError(f"not a readable safetensors file ({_first_line(exc)})", path=path) from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError("not a readable safetensors file (metadata must map names to strings)", path=path)
    return tensors, metadata
