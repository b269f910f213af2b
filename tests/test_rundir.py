"""Nothing lost, nothing let in: run names, the run lock, runs that hold work, checkpoints that know what
they belong to, the float cache keyed on the data loaded, stale temporary files (issue 12).

Each test reproduces what went wrong before: a name that was a path, two runs in one directory, an
interrupted run silently restarted, an edited or foreign checkpoint resumed, another dataset's float model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lowbit.checkpoint import load_checkpoint, save_checkpoint
from lowbit.cli import main
from lowbit.config import recipe_from_dict
from lowbit.data import DATASETS
from lowbit.errors import ConfigError, FormatError
from lowbit.run import check_run_name, run, run_lock

TINY = {
    "name": "t",
    "data": {"name": "synthetic", "train_subset": 256, "test_subset": 128, "batch_size": 64},
    "model": {"name": "mlp", "args": {"width": 16, "depth": 1}},
    "pretrain": {"epochs": 1},
    "qat": {"epochs": 2},
    "checkpoint_every": 2,
}
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["../x", "..", "/tmp/abs", "a/b", "", ".hidden", "a\\b", "x" * 200, "a b"])
def test_run_names_are_one_folder_name(name: str) -> None:
    with pytest.raises(ConfigError, match="is not allowed: a run name is one folder name"):
        check_run_name(name)


def test_cli_name_and_recipe_name_never_leave_the_runs_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runs, victim = tmp_path / "runs", tmp_path / "victim"
    victim.mkdir()
    (victim / "config.yaml").write_text("precious\n")
    assert main(["train", str(REPO / "recipes" / "tiny.yaml"), "--runs", str(runs), "--name", "../victim"]) == 2
    assert "--name='../victim' is not allowed" in capsys.readouterr().err
    assert main(["train", str(REPO / "recipes" / "tiny.yaml"), "name=../../victim", "--runs", str(runs)]) == 2
    assert "name (the recipe's)='../../victim' is not allowed" in capsys.readouterr().err
    assert (victim / "config.yaml").read_text() == "precious\n" and not runs.exists()
    (tmp_path / "afile").write_text("x")
    assert main(["train", "tiny", "--runs", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_second_run_in_a_locked_directory_is_refused(tmp_path: Path) -> None:
    recipe = recipe_from_dict(TINY)
    with run_lock(tmp_path / "r"), pytest.raises(ConfigError, match=r"is in use \(pid \d+ on .*\)"):
        run(recipe, tmp_path / "r", progress=False)
    run(recipe, tmp_path / "r", progress=False)  # the lock is released with its holder


def test_an_interrupted_run_is_not_restarted_without_asking(tmp_path: Path) -> None:
    recipe = recipe_from_dict(TINY)
    run(recipe, tmp_path / "r", progress=False)
    ck = tmp_path / "r" / "checkpoints" / "qat.safetensors"
    (tmp_path / "r" / "summary.json").unlink()  # as if killed before the end: checkpoints, no summary
    before = ck.read_bytes()
    with pytest.raises(ConfigError, match="holds the checkpoints of an unfinished run: pass --resume"):
        run(recipe, tmp_path / "r", progress=False)
    assert ck.read_bytes() == before
    run(recipe, tmp_path / "r", progress=False, force=True)  # asked: starts over
    with pytest.raises(ConfigError, match="holds a finished run"):
        run(recipe, tmp_path / "r", progress=False)


def test_a_failing_run_leaves_no_directory(tmp_path: Path) -> None:
    bad = recipe_from_dict({**TINY, "data": {**TINY["data"], "name": "no_such_dataset"}})
    with pytest.raises(ConfigError, match="no_such_dataset"):
        run(bad, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_an_edited_checkpoint_is_refused(tmp_path: Path) -> None:
    recipe = recipe_from_dict(TINY)
    run(recipe, tmp_path / "r", progress=False)
    (tmp_path / "r" / "summary.json").unlink()
    ck = tmp_path / "r" / "checkpoints" / "qat.safetensors"
    blob = ck.read_bytes()
    assert blob.count(b'\\"step\\": 8,') == 1
    ck.write_bytes(blob.replace(b'\\"step\\": 8,', b'\\"step\\": 2,'))  # the step counter, edited in place
    with pytest.raises(FormatError, match="fails its sha256 check"):
        run(recipe, tmp_path / "r", resume=True, progress=False)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("step", 10**9, r"step=1000000000 is not allowed: an integer from 0 to 8"),
        ("step", -1, r"step=-1 is not allowed"),
        ("train_loss", [float("nan"), 1], r"train_loss=list is not allowed"),
        ("rng", torch.zeros(3, dtype=torch.uint8), r"rng=Tensor is not allowed"),
        ("methods", [{}], r"methods=list is not allowed: a list of 0"),
        ("stage", "pretrain", r"stage='pretrain' is not allowed"),
    ],
)
def test_a_well_signed_checkpoint_with_bad_fields_is_refused(
    tmp_path: Path, field: str, value: object, match: str
) -> None:
    """A checkpoint re-signed by someone who knows the format: every field is still checked before use."""
    recipe = recipe_from_dict(TINY)
    run(recipe, tmp_path / "r", progress=False)
    (tmp_path / "r" / "summary.json").unlink()
    ck = tmp_path / "r" / "checkpoints" / "qat.safetensors"
    state = load_checkpoint(ck)
    state[field] = value
    save_checkpoint(ck, state)
    with pytest.raises(FormatError, match=match):
        run(recipe, tmp_path / "r", resume=True, progress=False)


def test_a_checkpoint_of_another_recipe_is_refused_naming_the_key(tmp_path: Path) -> None:
    """A 2-bit run's checkpoint copied into a 4-bit run's directory does not resume there."""
    two = recipe_from_dict({**TINY, "quant": {"weight": {"bits": 2}}})
    four = recipe_from_dict(TINY)
    run(two, tmp_path / "two", progress=False)
    run(four, tmp_path / "four", progress=False)
    (tmp_path / "four" / "summary.json").unlink()
    ck = "checkpoints/qat.safetensors"
    (tmp_path / "four" / ck).write_bytes((tmp_path / "two" / ck).read_bytes())
    with pytest.raises(FormatError, match=r"another recipe \(at quant\.weight\.bits: 2 in the run, 4 now\)"):
        run(four, tmp_path / "four", resume=True, progress=False)


def test_the_float_cache_follows_the_data_not_just_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_from_dict(TINY)
    first = run(recipe, tmp_path / "a", progress=False)
    real = DATASETS["synthetic"]
    monkeypatch.setitem(DATASETS, "synthetic", lambda split_seed=0: real(split_seed=split_seed + 1))  # other files
    second = run(recipe, tmp_path / "b", progress=False)
    assert len(list((tmp_path / ".cache").glob("float-*.safetensors"))) == 2
    assert (tmp_path / "b" / "checkpoints" / "pretrain.safetensors").exists(), "trained again, not reused"
    assert first["float_metric"] != second["float_metric"]


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    recipe = recipe_from_dict(TINY)
    run(recipe, tmp_path / "r", progress=False)
    ckdir = tmp_path / "r" / "checkpoints"
    dead = ckdir / ".qat.safetensors.tmp999999999"
    alive = ckdir / f".qat.safetensors.tmp{os.getppid()}"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    run(recipe, tmp_path / "r", progress=False, force=True)
    assert not dead.exists() and alive.exists()


def test_resumed_metrics_have_each_row_once_in_order(tmp_path: Path) -> None:
    recipe = recipe_from_dict(TINY)
    run(recipe, tmp_path / "r", progress=False)
    ref = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "r" / "summary.json").unlink()
    run(recipe, tmp_path / "r", resume=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(r["stage"], r["step"]) for r in ref]
    assert [r.get("test_accuracy") for r in rows] == [r.get("test_accuracy") for r in ref]


def test_cli_small_things(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0 and "usage: lowbit" in capsys.readouterr().out  # a bare `lowbit` helps
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("lowbit ")
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "hi", "--max-new-tokens", "-3"])
    assert e.value.code == 2 and "'-3' is not allowed" in capsys.readouterr().err
    summary = run(recipe_from_dict(TINY), tmp_path / "r", progress=False)
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path)]) == 2
    assert "is a folder: pass a file path" in capsys.readouterr().err
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    (tmp_path / "cut" / "config.yaml").write_text("name: cut\n")
    (tmp_path / "cut" / "checkpoints" / "qat.safetensors").write_bytes(b"")
    assert main(["runs", "--runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "model", "/"] and len(table) == 3
    assert table[1].startswith("cut ") and table[1].endswith("interrupted")
    assert table[2].startswith("r ") and f"{summary['quant_metric']:.2f}" in table[2] and table[2].endswith("finished")


def test_fuzzed_checkpoints_resume_or_raise_format_error(tmp_path: Path) -> None:
    """300 damaged checkpoints (bytes flipped, cut, or the JSON edited and re-signed): resuming from each
    either works or raises FormatError naming the checkpoint, never another exception."""
    import random

    from safetensors import safe_open
    from safetensors.torch import save_file

    import lowbit
    from lowbit.checkpoint import digest
    from lowbit.config import recipe_to_dict
    from lowbit.tasks.vision import VisionTask
    from lowbit.train import Stage, train_stage

    recipe = recipe_from_dict({**TINY, "qat": {"epochs": 1}, "pretrain": {"epochs": 0}})
    run(recipe, tmp_path / "r", progress=False)
    ck = tmp_path / "r" / "checkpoints" / "qat.safetensors"
    task = VisionTask(recipe)
    model = lowbit.prepare(task.new_model(), recipe.quant, calib=task.calib(1))
    resolved = json.loads(json.dumps(recipe_to_dict(recipe)))
    stage = Stage("qat", recipe.qat, tmp_path / "r", recipe.seed, 0, False, (), resolved)
    good = ck.read_bytes()
    with safe_open(str(ck), framework="pt") as f:
        meta = json.loads(f.metadata()["lowbit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    rng = random.Random(0)
    values = [None, -1, 0, 1, 2**40, 1.5, float("inf"), "x", [], {}, [1, 2], {"__tensor__": "nope"}, True]

    def leaves(node: object, path: tuple = ()) -> list[tuple]:
        if isinstance(node, dict):
            return [p for k, v in node.items() for p in leaves(v, (*path, k))] or [path]
        if isinstance(node, list):
            return [p for i, v in enumerate(node) for p in leaves(v, (*path, i))] or [path]
        return [path]

    paths = leaves(meta["state"])
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        kind = i % 3
        if kind == 0:  # flipped bytes
            blob = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
            ck.write_bytes(bytes(blob))
        elif kind == 1:  # cut short
            ck.write_bytes(good[: rng.randrange(len(good))])
        else:  # a field replaced and the file re-signed, as someone who knows the format would
            state = json.loads(json.dumps(meta["state"]))
            path = rng.choice(paths)
            node = state
            for key in path[:-1]:
                node = node[key]
            if path:
                node[path[-1]] = rng.choice(values)
            signed = {"format_version": meta["format_version"], "state": state, "sha256": digest(state, tensors)}
            save_file(tensors, str(ck), metadata={"lowbit": json.dumps(signed)})
        try:
            train_stage(model, task, stage, [], resume=True)  # the resume path of every run
            outcomes["ok"] += 1
        except FormatError as e:
            assert "qat.safetensors" in str(e) or "checkpoint" in str(e), e
            outcomes["refused"] += 1
        ck.write_bytes(good)
    assert outcomes["refused"] > 150, outcomes


def test_thread_choice_respects_the_user_and_counts_idle_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.run import choose_threads, idle_cores

    before = torch.get_num_threads()
    try:
        assert choose_threads(recipe_from_dict({**TINY, "threads": 1})) == "1 threads (recipe)"
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert choose_threads(recipe_from_dict(TINY)) is None and torch.get_num_threads() == before
        n = idle_cores(0.05)
        assert n is None or 1 <= n <= len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)
