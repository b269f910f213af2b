"""Training under torchrun (``lowbit.distributed``): 2 CPU processes over gloo, small models, real pipeline.

One 2-process launch of ``tests/dist_worker.py`` trains every case; each rank saves its model, method and
optimizer state after QAT. Every rank must hold bit-identical state (the run itself also compares digests at
each evaluation and would have stopped otherwise); a 2-process run must reach a 1-process run's weights up
to float rounding; killing one rank must stop the run, and ``--resume`` must finish it exactly as an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit import distributed
from lowbit.errors import ConfigError

pytestmark = pytest.mark.xdist_group("distributed")  # one worker runs the module: its 2-process launches once

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
CASES = ["qat", "freeze_bn", "qbitopt", "cema", "lrqat", "nobn_w8", "lrqat_fsdp", "lrqat_emb", "lrqat_emb_fsdp"]


def torchrun(n: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """A torchrun launch; a failed one is launched once more (a CLI run with --force unless it resumes).

    In about one full-suite run in five on this machine, one launch of the suite ended non-zero under the
    other xdist worker's load, and it never reproduced alone (16 tries); its stderr was not kept. The
    retry keeps CI from failing on that while the first failure's stderr goes into a warning (shown in
    pytest's summary) so that it can be diagnosed: a real failure fails twice and is asserted as before."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if r.returncode == 0:
        return r
    warnings.warn(f"torchrun launch failed once (rc {r.returncode}), retrying: {r.stderr[-4000:]}", stacklevel=2)
    again = [*cmd, "--force"] if "lowbit" in args and "--resume" not in args else cmd
    return subprocess.run(again, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    r = torchrun(2, [str(WORKER), str(two), "faults", *CASES])
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(1, [str(WORKER), str(one), "nobn_w8", "lrqat"])
    assert r.returncode == 0, r.stderr[-3000:]
    return two, one


def _ranks(out: Path, case: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(out / case / "rank0.safetensors"), load_file(out / case / "rank1.safetensors")


@pytest.mark.parametrize("case", CASES)
def test_every_rank_holds_the_same_model_method_and_optimizer_state(trained: tuple[Path, Path], case: str) -> None:
    a, b = _ranks(trained[0], case)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ between the ranks, e.g. {differ[:3]}"
    assert any(k.startswith("optimizer.") for k in a) and any(k.startswith("model.") for k in a)


def test_the_methods_acted_so_their_state_is_not_trivially_equal(trained: tuple[Path, Path]) -> None:
    two = trained[0]
    frozen = [v for k, v in _ranks(two, "freeze_bn")[0].items() if k.endswith("int_transform.frozen")]
    assert frozen and sum(int(v.sum()) for v in frozen) > 0  # some weights froze
    rows = [json.loads(x) for x in (two / "qbitopt" / "run" / "metrics.jsonl").read_text().splitlines()]
    allocations = [a for r in rows if r["stage"] == "qat" for a in r["qbitopt"]["allocations"]]
    assert len(allocations) >= 3  # the start and reallocations at steps 2, 4, 6
    cema = _ranks(two, "cema")[0]
    assert any(".state." in k for k in cema if k.startswith("optimizer.optimizers.2"))  # CEMA's filters


def test_rank_zero_alone_writes_and_rows_are_logged_once(trained: tuple[Path, Path]) -> None:
    run = trained[0] / "qat" / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows if r["stage"] in ("qat", "final")] == [
        ("qat", 4), ("qat", 8), ("final", 8)]  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and (run / "model.safetensors").is_file() and (run / "report.html").is_file()
    assert not list(run.glob("*.tmp*")) and not list((run / "checkpoints").glob("*.tmp*"))


def test_two_processes_reach_one_process_weights_up_to_float_rounding(trained: tuple[Path, Path]) -> None:
    """Not bit-exact: each rank sums half the batch and the halves are then added, so a gradient differs
    from the one-process sum in the last bits (float addition is not associative). With fixed scales
    (``nobn_w8``: 8-bit weights, no batch norm, 16 float steps then 8 QAT steps) the weights agree to
    1e-5 of their largest value. LR-QAT (``lrqat``, 4 steps, Adam on the adapters) to 1e-6 absolute. With
    learned scales the gap is larger: Adam divides a near-zero scale gradient by its own small running
    norm, so last-bit differences become steps of lr's size (measured: 1e-4 on weights after 24 steps)."""
    two, one = trained
    for case, rel, absolute in (("nobn_w8", 1e-5, 0.0), ("lrqat", 0.0, 1e-6)):
        a, ref = _ranks(two, case)[0], load_file(one / case / "rank0.safetensors")
        for k, v in ref.items():
            if k.startswith("model.") and v.is_floating_point() and v.numel():
                tol = rel * float(v.abs().max()) + absolute
                assert float((a[k] - v).abs().max()) <= tol, (case, k)


def test_fsdp_shards_every_parameter_and_trains_as_the_unsharded_run(trained: tuple[Path, Path]) -> None:
    """FSDP2 over 2 processes: Φ0 (int8, frozen), adapters, scales, embeddings each held half per rank; the
    weights reached equal the gradient-averaging run's to float rounding (1e-6; measured 2e-8)."""
    two = trained[0]
    whole = load_file(two / "lrqat_fsdp" / "rank0.safetensors")
    for rank in (0, 1):
        shards = json.loads((two / "lrqat_fsdp" / f"shards-rank{rank}.json").read_text())
        phi0 = [k for k in shards if k.endswith(".phi0")]
        assert len(phi0) == 14 and all(k.endswith((".phi0", ".lora_a", ".lora_b", ".scale", ".weight")) for k in shards)
        for k in phi0 + ["model.embed_tokens.weight"]:
            assert shards[k] * 2 == whole[f"model.{k}"].numel()
    assert json.loads((two / "lrqat" / "shards-rank0.json").read_text()) == {}
    ddp = load_file(two / "lrqat" / "rank0.safetensors")
    assert whole.keys() == ddp.keys()
    for k, v in ddp.items():
        if v.is_floating_point() and v.numel():
            assert float((whole[k] - v).abs().max()) <= 1e-6, k


def test_fsdp_trains_the_root_units_parameters_as_the_unsharded_run(trained: tuple[Path, Path]) -> None:
    """A quantized embedding's scales live in FSDP's root unit, which keeps its parameters gathered after the
    evaluation before training: optimizers built then held gathered copies that never trained (the scales
    stayed put, 1e-4 from the gradient-averaging run's after one step). They are built from the shards."""
    two = trained[0]
    whole = load_file(two / "lrqat_emb_fsdp" / "rank0.safetensors")
    ddp = load_file(two / "lrqat_emb" / "rank0.safetensors")
    key = "model.model.embed_tokens.weight_quantizer.scale"
    assert whole.keys() == ddp.keys() and key in ddp
    for k, v in ddp.items():
        if v.is_floating_point() and v.numel():
            assert float((whole[k] - v).abs().max()) <= 1e-6, k


def test_a_sharded_run_resumes_in_one_process_to_the_same_model(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """The checkpoint holds whole tensors, written once by rank 0: one process resumes the finished FSDP run
    from it (no step left) and writes the same integer model."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(trained[0] / "lrqat_fsdp" / "run", runs / "run")
    before = lowbit.load(runs / "run" / "model.safetensors").state_dict()
    (runs / "run" / "model.safetensors").unlink()
    args = ["llm-tiny", "qat.steps=4", "qat.eval_every=2", "checkpoint_every=2", "threads=1", "--no-progress"]
    cmd = [sys.executable, "-m", "lowbit", "train", *args, "--runs", str(runs), "--name", "run", "--resume"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    after = lowbit.load(runs / "run" / "model.safetensors").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fsdp_refuses_what_it_cannot_shard(tmp_path: Path) -> None:
    from lowbit.config import load_recipe
    from lowbit.run import run

    with pytest.raises(ConfigError, match="--fsdp shards causal language models"):
        run(load_recipe(ROOT / "recipes" / "tiny.yaml"), tmp_path / "a", fsdp=True)
    llm = load_recipe(ROOT / "recipes" / "llm-tiny.yaml", ["methods=[{name: qbitopt, average_bits: 3}]"])
    with pytest.raises(ConfigError, match=r"--fsdp: methods \['qbitopt'\] read their layers' weights"):
        run(llm, tmp_path / "b", fsdp=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_drifted_state_and_a_failure_on_rank_zero_stop_every_rank(trained: tuple[Path, Path]) -> None:
    for rank in (0, 1):
        seen = (trained[0] / f"faults-rank{rank}.txt").read_text().splitlines()
        assert seen[0].startswith("TrainingError: test: 'w' differs between rank")
        assert seen[1] == "ConfigError: data.batch_size=0 is not allowed"
        assert seen[2] == "on_main: rank0 value"


def test_one_process_helpers_are_identities() -> None:
    batch = (torch.arange(6), torch.arange(6) * 2)
    assert distributed.shard(batch) == (batch, 1.0)
    assert distributed.world() == distributed.World(0, 1, 0) and distributed.is_main()
    t = torch.ones(2)
    assert distributed.all_reduce(t) is t and torch.equal(t, torch.ones(2))
    assert distributed.on_main(lambda: 7) == 7 and distributed.agree(True) and not distributed.agree(False)


def test_a_half_set_torchrun_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but RANK is not set: launch with torchrun"):
        distributed.init()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two': expected an integer"):
        distributed.init()


def test_shards_cover_the_batch_and_weigh_ranks_by_their_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of an uneven batch (7 over 2 or 3 ranks) tile it in order, and Σ share · (mean over the slice)
    / ranks is the mean over the batch, which is what averaging the ranks' gradients computes."""
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    for size in (2, 3):
        parts, total = [], torch.zeros(3, dtype=torch.float64)
        for rank in range(size):
            monkeypatch.setattr(distributed, "world", lambda r=rank, n=size: distributed.World(r, n, r))
            (part, y), share = distributed.shard((x, torch.arange(7)))
            assert torch.equal(y, torch.arange(7)[rank * 7 // size : (rank + 1) * 7 // size])
            parts.append(part)
            total += share * part.double().mean(0) / size
        assert torch.equal(torch.cat(parts), x)
        torch.testing.assert_close(total, x.double().mean(0))
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 8, 0))
    with pytest.raises(ConfigError, match="a batch of 7 samples cannot be shared by 8 processes"):
        distributed.shard((x, x))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_killing_one_rank_stops_the_run_and_resume_finishes_it_exactly(tmp_path: Path) -> None:
    args = ["-m", "lowbit", "train", "tiny", "data.name=synthetic", "data.train_subset=1000",
            "data.test_subset=100", "data.batch_size=50", "qat.steps=1500", "qat.eval_every=500",
            "checkpoint_every=100", "--no-progress"]  # fmt: skip
    ref = torchrun(2, [*args, "--runs", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    runs = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
           "--runs", str(runs)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint, deadline = runs / "tiny" / "checkpoints" / "qat.safetensors", time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = [c for agent in _children(proc.pid) for c in [agent, *_children(agent)]]
    victim = next((p for p in workers if _rank_of(p) == 1), None)
    assert victim is not None and proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "FAILED" in err  # torchrun names the failed rank and its signal
    assert not (runs / "tiny" / "summary.json").exists()
    resumed = torchrun(2, [*args, "--runs", str(runs), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = lowbit.load(runs / "tiny" / "model.safetensors").state_dict()
    b = lowbit.load(tmp_path / "ref" / "tiny" / "model.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
