"""Training checkpoints: one safetensors file per stage, written atomically, no pickle.

A checkpoint holds tensors (model, optimizer state, RNG, method state) in safetensors, and everything
else (step, epoch, optimizer hyper-parameters, scheduler state) as JSON in the file's own metadata, so
a single ``os.replace`` makes the whole checkpoint appear at once: a crash (even ``kill -9``) leaves
either the previous checkpoint or the new one, never half of each. A readable ``.json`` copy of the
metadata is written beside it for people; loading never reads it.

Nested state (``optimizer.state_dict()`` and friends) is flattened: each tensor becomes a safetensors
entry and is replaced in the JSON skeleton by ``{"__tensor__": key}``; dicts with non-string keys are
stored as ``{"__items__": [[key, value], ...]}`` so integer keys survive the round trip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.errors import FormatError

__all__ = ["flatten_state", "unflatten_state", "save_checkpoint", "load_checkpoint", "atomic_write_text"]

FORMAT_VERSION = 1


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
    meta = json.dumps({"format_version": FORMAT_VERSION, "state": skeleton})
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
    except json.JSONDecodeError as e:
        raise FormatError(f"checkpoint {str(path)!r} has unreadable metadata ({e})") from None
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"checkpoint {str(path)!r} has format_version={version!r}; this lowbit reads {FORMAT_VERSION}"
        )
    return unflatten_state(info["state"], tensors)
