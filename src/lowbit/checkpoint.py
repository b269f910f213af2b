"""Training checkpoints: one safetensors file per stage, written atomically, no pickle, checked on load.

A checkpoint holds tensors (model, optimizer state, RNG, method state) in safetensors, and everything
else (step, epoch, optimizer hyper-parameters, scheduler state) as JSON in the file's own metadata, so
a single ``os.replace`` makes the whole checkpoint appear at once: a crash (even ``kill -9``) leaves
either the previous checkpoint or the new one, never half of each. A readable ``.json`` copy of the
metadata is written beside it for people; loading never reads it.

Nested state (``optimizer.state_dict()`` and friends) is flattened: each tensor becomes a safetensors
entry and is replaced in the JSON skeleton by ``{"__tensor__": key}``; dicts with non-string keys are
stored as ``{"__items__": [[key, value], ...]}`` so integer keys survive the round trip.

The metadata carries a sha256 over itself and every tensor's name, dtype, shape and bytes (as model
files do), so an edited step counter or a swapped tensor is refused; the JSON is read with a depth limit.
What the fields must hold is checked by the loop that reads them (``lowbit.train``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.errors import FormatError

__all__ = [
    "flatten_state", "unflatten_state", "save_checkpoint", "load_checkpoint", "atomic_write_text", "digest",
    "remove_stale_temp_files",
]  # fmt: skip

FORMAT_VERSION = 2  # 2: a sha256 over metadata and tensors
MAX_DEPTH = 64  # nesting of the JSON skeleton (optimizer states nest about 6 deep)


def digest(meta: Any, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the JSON of ``meta`` and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of plain JSON data, without recursion (a hostile file cannot overflow the stack)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if d > limit:
            return d
        deepest = max(deepest, d)
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete ``.<name>.tmp<pid>`` files that a process which no longer runs left in ``folder``."""
    removed = []
    for tmp in folder.glob(".*.tmp*") if folder.is_dir() else []:
        pid = tmp.name.rpartition(".tmp")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except (PermissionError, OverflowError, ValueError):
            continue  # alive under another user, or not a pid: leave it
    return removed


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj``; its tensors go to ``tensors`` under keys starting with ``prefix``."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {prefix})")


def unflatten_state(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(skel, dict):
        if set(skel) == {"__tensor__"}:
            key = skel["__tensor__"]
            if key not in tensors:
                raise FormatError(f"checkpoint is missing tensor {key!r}")
            return tensors[key]
        if set(skel) == {"__items__"}:
            return {k: unflatten_state(v, tensors) for k, v in skel["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in skel.items()}
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    return skel


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts of tensors and plain values) atomically to ``path`` (.safetensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, "s", tensors)
    for k, t in list(tensors.items()):
        tensors[k] = t.detach().cpu().contiguous()
    meta = json.dumps({"format_version": FORMAT_VERSION, "state": skeleton, "sha256": digest(skeleton, tensors)})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # safetensors refuses tensors that share memory; checkpoints are small, so copy those
    seen: dict[int, str] = {}
    for k, t in list(tensors.items()):
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[k] = t.clone()
        seen[ptr] = k
    save_file(tensors, str(tmp), metadata={"lowbit": meta})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps(json.loads(meta), indent=1))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; damage raises ``FormatError`` saying what."""
    if not path.is_file():
        raise FormatError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(
            f"checkpoint {str(path)!r} is corrupted or truncated ({e}); delete it to start over"
        ) from None
    if "lowbit" not in meta:
        raise FormatError(f"checkpoint {str(path)!r} has no lowbit metadata: not a lowbit checkpoint")
    try:
        info = json.loads(meta["lowbit"])
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise FormatError(f"checkpoint {str(path)!r} has unreadable metadata ({type(e).__name__})") from None
    if not isinstance(info, dict) or _depth(info, MAX_DEPTH) > MAX_DEPTH:
        raise FormatError(f"checkpoint {str(path)!r}: its metadata is not a mapping of at most {MAX_DEPTH} levels")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"checkpoint {str(path)!r} has format_version={version!r}; this lowbit reads {FORMAT_VERSION} "
            "(start the run again)"
        )
    if info.get("sha256") != digest(info.get("state"), tensors):
        raise FormatError(f"checkpoint {str(path)!r} fails its sha256 check: it was damaged or edited after saving")
    try:
        return unflatten_state(info["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"checkpoint {str(path)!r} has a malformed state ({type(e).__name__}: {e})") from None
