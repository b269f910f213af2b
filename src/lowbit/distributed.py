"""Multi-process training under ``torchrun``: set-up, rank-aware batches, and the helpers that keep every
rank's state identical. Nothing else in lowbit calls ``torch.distributed``.

``torchrun --nproc-per-node N -m lowbit train RECIPE`` (or ``lowbit train`` launched by torchrun) starts N
processes; ``init()`` joins them (gloo on CPU, NCCL on CUDA, each process on its ``LOCAL_RANK`` device).
Outside torchrun, or with one process, every helper here is a no-op and nothing is initialised.

How the pieces stay equal on every rank:

- **Batches.** The task yields the *global* batch of each step, which depends only on the seed and the
  step; ``shard`` hands each rank its contiguous slice. So the data order is the same for 1 or N
  processes, and a run can resume with another process count whenever the global batch divides.
- **Gradients.** ``average_gradients`` all-reduces the trainable parameters' gradients after the
  backward pass and divides by N, in buckets of about 25 MB (what DistributedDataParallel computes; see
  ``lowbit.train`` for why the model is not wrapped). Every rank then takes the same optimizer step.
- **State that is not a gradient**: calibration, batch-norm re-estimation and sensitivity probes read the
  same (unsharded) batches on every rank, so they agree by construction; what is accumulated from
  per-rank gradients (QBitOpt's Fisher traces) is averaged with ``all_reduce`` before it is used; batch
  statistics are averaged after each step (``average_buffers``). ``check_identical`` proves it: every
  evaluation compares a digest of each tensor of the model and of every method's state across ranks,
  and stops the run naming the first tensor that differs.
- **Files.** Rank 0 alone writes (checkpoints, metrics, summary, report, the exported model); the others
  wait at a barrier. Every rank reads the same checkpoint on ``--resume``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lowbit.checkpoint import digest
from lowbit.errors import ConfigError, FormatError, TrainingError

__all__ = [
    "World", "init", "world", "is_main", "shard", "average_tensors", "average_gradients", "average_buffers",
    "all_reduce", "on_main", "shard_model", "is_sharded", "is_dtensor", "full_tensors", "fit_state",
    "fit_optimizer_state",
    "broadcast_object", "agree", "barrier", "tensor_digests", "check_identical", "shutdown",
]  # fmt: skip

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size
TIMEOUT = datetime.timedelta(minutes=10)  # a rank that died makes the others fail after this, not hang


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer (torchrun sets it)") from None


def world() -> World:
    """The current world: from the process group once ``init`` ran, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World()


def is_main() -> bool:
    return world().main


def init(device: str = "cpu") -> World:
    """Join the torchrun process group if this process was launched by torchrun with more than one
    process (``WORLD_SIZE`` > 1); returns the world. gloo for CPU runs, NCCL for CUDA runs."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch was built without torch.distributed")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"WORLD_SIZE={size} but {var} is not set: launch with torchrun --nproc-per-node N")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return world()


def torch_device(name: str) -> torch.device:
    """The device a recipe's ``device`` names, checked against this machine: a CUDA device that is not
    there is a ConfigError, never a silent CPU run. Under torchrun a bare ``cuda`` is this process's GPU."""
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: this torch has no CUDA device; use cpu")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _rows(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, tuple | list):
        return next((n for n in map(_rows, batch) if n is not None), None)
    return None


def _slice(x: Any, lo: int, hi: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[lo:hi]
    if isinstance(x, tuple | list):
        return type(x)(_slice(v, lo, hi) for v in x)
    return x


def shard(batch: Any, field: str = "data.batch_size") -> tuple[Any, float]:
    """This rank's contiguous slice (along dim 0) of every tensor of a global batch, and the factor that
    makes the ranks' averaged gradients those of the global batch's mean loss.

    The slices differ by at most one sample when the batch does not divide (an epoch's last batch); the
    factor ``n_rank · N_ranks / n_batch`` weighs each rank's mean loss by its share, so the average over
    ranks is the mean over the whole batch exactly (and a loss term that is not a mean over samples, a
    regulariser, is counted once). One process: the batch itself and 1.0.
    """
    w = world()
    n = _rows(batch)
    if w.size == 1 or n is None:
        return batch, 1.0
    if n < w.size:
        raise ConfigError(f"a batch of {n} samples cannot be shared by {w.size} processes: set {field} (and the "
                          f"training set's size modulo it) to at least {w.size}")  # fmt: skip
    lo, hi = w.rank * n // w.size, (w.rank + 1) * n // w.size
    return _slice(batch, lo, hi), (hi - lo) * w.size / n


def all_reduce(t: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """``t`` reduced over ranks in place (``mean``, ``sum``, ``max`` or ``min``); returns it."""
    w = world()
    if w.size == 1:
        return t
    ops = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(t, ops[op])
    if op == "mean":
        t.div_(w.size)
    return t


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):  # fmt: skip
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def _average(tensors: list[torch.Tensor]) -> None:
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        all_reduce(flat, "mean")
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            t.copy_(part.view_as(t))


def average_tensors(tensors: list[torch.Tensor]) -> None:
    """Average each tensor over ranks in place (the same list, in the same order, on every rank)."""
    if world().size > 1:
        _average(tensors)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks, as DDP does. A parameter without a gradient on every
    rank keeps none (optimizers skip it, as in one process); one with a gradient on some ranks only takes
    part with zeros from the others, so the collective calls match on every rank."""
    if world().size == 1:
        return
    params = [p for p in params if not is_dtensor(p)]  # FSDP reduce-scatters its own
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    all_reduce(has, "sum")
    used = [p for p, n in zip(params, has.tolist(), strict=True) if n > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _average([p.grad for p in used])


def average_buffers(model: torch.nn.Module) -> None:
    """Average the floating-point running statistics (``running_mean`` / ``running_var`` of batch norms)
    over ranks: each rank normalises with its own shard's statistics, as under DDP, but the running
    estimates that evaluation uses stay equal (the mean of the ranks' estimates; the variance misses the
    spread between the shards' means, a bias of the order of 1 / (batch per rank))."""
    if world().size == 1:
        return
    stats = [b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    _average([b for b in stats if b.is_floating_point()])


_ERRORS = {cls.__name__: cls for cls in (ConfigError, FormatError, TrainingError)}


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 alone, its result given to every rank; an error it raises is raised on every
    rank (a ConfigError as a ConfigError, with the same message), so no rank waits for a dead one."""
    w = world()
    if w.size == 1:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if w.main:
        try:
            outcome = ("ok", fn())
        except Exception as e:
            outcome = (type(e).__name__, str(e))
            broadcast_object(outcome)
            raise
    outcome = broadcast_object(outcome)
    kind, value = outcome
    if kind != "ok":
        raise _ERRORS.get(kind, RuntimeError)(value if kind in _ERRORS else f"rank 0 failed: {kind}: {value}")
    return value


# -- FSDP2 -------------------------------------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model ``shard_model`` sharded (its parameters are DTensors, gathered only while it runs)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 (``fully_shard``): one unit per block of the model's largest ``nn.ModuleList`` (a transformer's
    decoder layers), then the root for the rest (embeddings, final norm, head). Every parameter, frozen
    ones included (LR-QAT's Φ0 is one), is split in N along dim 0; a block's are all-gathered while it
    runs forward or backward, and gradients are reduce-scattered, so ``average_gradients`` leaves them."""
    from torch.distributed.fsdp import fully_shard

    if world().size == 1:
        return
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError(f"--fsdp: {type(model).__name__} has no list of blocks (nn.ModuleList) to shard by; "
                          "train it without --fsdp (gradients are then averaged, the model held whole)")  # fmt: skip
    blocks = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit of ``model`` back to its shards. The root unit keeps its parameters gathered after
    a forward pass (FSDP2's default for the root); an optimizer built then would hold those gathered copies,
    which FSDP swaps out again, and their parameters would never train. Call before building optimizers."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensors(obj: Any) -> Any:
    """``obj`` (a state dict, nested) with every DTensor gathered whole; a collective when it holds any, so
    every rank must call it with the same structure. Plain tensors are returned as they are."""
    if is_dtensor(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


def _local_like(full: torch.Tensor, like: Any) -> torch.Tensor:
    """``full`` as a DTensor sharded like ``like`` (each rank keeps its own part; no communication)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def fit_state(state: dict[str, torch.Tensor], current: dict[str, Any]) -> dict[str, Any]:
    """A whole-tensor state dict (as checkpoints hold it) made loadable into a model whose ``state_dict()``
    is ``current``: entries that are DTensors there become this rank's shard."""
    return {k: _local_like(v, current[k]) if k in current and is_dtensor(current[k]) else v for k, v in state.items()}


def fit_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a whole-tensor optimizer state: each sharded parameter's state tensors
    of its full shape become shards like the parameter (a scalar such as Adam's step stays as it is)."""
    for p, st in opt.state.items():
        if is_dtensor(p):
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and not is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                    st[k] = _local_like(v, p)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (small plain data: decisions, summaries)."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on every rank, else False on every rank."""
    if world().size == 1:
        return bool(flag)
    return bool(all_reduce(torch.tensor([int(bool(flag))]), "min").item())


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """A short sha256 of each tensor's name, dtype, shape and bytes (``lowbit.checkpoint.digest``)."""
    return {k: digest(None, {k: t.detach().cpu()})[:16] for k, t in tensors.items()}


def check_identical(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``TrainingError`` on every rank unless ``tensors`` are bit-identical on every rank."""
    w = world()
    if w.size == 1:
        return
    mine = tensor_digests(tensors)
    everyone: list[Any] = [None] * w.size
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            keys = sorted(set(theirs) | set(mine))
            first = next(k for k in keys if theirs.get(k) != mine.get(k))
            raise TrainingError(
                f"{what}: {first!r} differs between rank {w.rank} and rank {rank} (the ranks' states drifted apart; "
                "this is a bug in lowbit, please report it with the recipe)"
            )
