"""Run under torchrun by ``tests/test_distributed.py`` (not a test module): ``lowbit.run.run`` on small recipes,
each rank saving what it trained.

    torchrun --nproc-per-node N tests/dist_worker.py OUT CASE [CASE ...]

For each case the real pipeline runs into ``OUT/CASE/run``; after the QAT stage every rank writes
``OUT/CASE/rank<r>.safetensors``: the model's state, every method's state and the stage's optimizers'
state (``model.*``, ``method<i>.*``, ``optimizer.*``), so the test can compare the ranks bit for bit
and a 2-process run with a 1-process one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import lowbit.run
import lowbit.train
from lowbit import distributed
from lowbit.checkpoint import flatten_state
from lowbit.config import load_recipe, recipe_from_dict, recipe_to_dict
from lowbit.errors import ConfigError, TrainingError
from lowbit.validate import apply_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VISION = ["data.name=synthetic", "data.train_subset=509", "data.test_subset=200", "data.batch_size=64",
          "pretrain.epochs=1", "qat.steps=8", "qat.eval_every=4", "checkpoint_every=4"]  # fmt: skip
BIREAL = {"model": {"name": "birealnet", "args": {"width": 8, "blocks": 1}}}
CASES: dict[str, tuple[str, dict[str, Any], list[str]]] = {  # recipe, replaced sections, overrides
    "qat": ("tiny", {}, VISION),
    "nobn": ("tiny", {"model": {"name": "mlp", "args": {"width": 64, "depth": 1, "batch_norm": False}}}, VISION),
    "nobn_w8": ("tiny", {"model": {"name": "mlp", "args": {"width": 64, "depth": 1, "batch_norm": False}},
                         "quant": {"weight": {"bits": 8, "granularity": "channel", "learn_scale": False}, "act": None}},
                VISION),
    "freeze_bn": ("tiny", {**BIREAL, "methods": [
        {"name": "oscillation_freezing", "momentum": 0.3, "threshold_start": 0.01, "threshold_final": 0.001,
         "start": 0.0},
        {"name": "bn_reestimation", "num_batches": 2, "every_eval": True}]}, VISION),
    "qbitopt": ("tiny", {"model": {"name": "mlp", "args": {"width": 32, "depth": 3}}, "methods": [
        {"name": "qbitopt", "average_bits": 3, "tau": 2, "pin_first_last": False}]}, VISION),
    "cema": ("birealnet-binary", {**BIREAL, "methods": [{"name": "binary", "optimizer": "cema"}]}, VISION),
    "lrqat": ("llm-tiny", {}, ["qat.steps=4", "qat.eval_every=2", "checkpoint_every=2", "threads=1"]),
}  # fmt: skip
CASES["lrqat_fsdp"] = CASES["lrqat"]  # the same run, sharded with FSDP2 (a case ending in _fsdp)
# the embedding quantized too: its scales are the root unit's only trainable parameters
CASES["lrqat_emb"] = ("llm-tiny", {}, [*CASES["lrqat"][2], "quant.embedding={bits: 4, granularity: channel}"])
CASES["lrqat_emb_fsdp"] = CASES["lrqat_emb"]


def recipe(case: str) -> Any:
    name, sections, overrides = CASES[case]
    d = recipe_to_dict(load_recipe(RECIPES / f"{name}.yaml"))
    return recipe_from_dict(apply_overrides({**d, **sections}, overrides))


def faults(out: Path, rank: int) -> None:
    """What each rank sees when the ranks' state differs, and when rank 0 fails alone."""
    seen = []
    try:
        distributed.check_identical({"same": torch.ones(3), "w": torch.tensor([float(rank)])}, "test")
    except TrainingError as e:
        seen.append(f"TrainingError: {e}")

    def fail() -> None:
        raise ConfigError("data.batch_size=0 is not allowed")

    try:
        distributed.on_main(fail)
    except ConfigError as e:
        seen.append(f"ConfigError: {e}")
    seen.append(f"on_main: {distributed.on_main(lambda: 'rank0 value' if distributed.is_main() else 'other')}")
    (out / f"faults-rank{rank}.txt").write_text("\n".join(seen))


def main(out: Path, cases: list[str]) -> None:
    world = distributed.init("cpu")
    out.mkdir(parents=True, exist_ok=True)
    if "faults" in cases:
        faults(out, world.rank)
        cases = [c for c in cases if c != "faults"]
    opts: list[Any] = []
    real_init = lowbit.train._Optimizers.__init__

    def keep(self: Any, *args: Any, **kwargs: Any) -> None:  # remember the stage's optimizers
        real_init(self, *args, **kwargs)
        opts.append(self)

    lowbit.train._Optimizers.__init__ = keep  # type: ignore[method-assign]
    real_stage = lowbit.run.train_stage
    for case in cases:

        def stage_then_save(model: Any, task: Any, stage: Any, methods: Any = None, resume: bool = False,
                            case: str = case) -> Any:  # fmt: skip
            last = real_stage(model, task, stage, methods, resume=resume)
            shards = {n: p.to_local().numel() for n, p in model.named_parameters() if distributed.is_dtensor(p)}
            (out / case / f"shards-rank{world.rank}.json").write_text(json.dumps(shards))
            whole = distributed.full_tensors(model.state_dict())  # gathered where FSDP sharded it
            tensors = {f"model.{k}": v.detach().clone() for k, v in whole.items()}
            for i, m in enumerate(methods or []):
                flatten_state(m.state_dict(), f"method{i}", tensors)
            flatten_state(distributed.full_tensors(opts[-1].state_dict()), "optimizer", tensors)
            path = out / case / f"rank{world.rank}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
            return last

        lowbit.run.train_stage = stage_then_save  # type: ignore[assignment]
        (out / case).mkdir(parents=True, exist_ok=True)
        lowbit.run.run(recipe(case), out / case / "run", progress=False, force=True, fsdp=case.endswith("_fsdp"))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
