"""QAT step time on a shared machine: OpenMP's wait policy and the thread count, quiet and beside a busy process.

Each configuration runs in a fresh process (OpenMP reads ``OMP_WAIT_POLICY`` when torch loads): ``steps``
LSQ QAT steps of the MobileNetV2-style model (W4A4, batch 128, 28×28), timed after a warm-up; the median
step is reported. "busy" runs one pure-Python spinning process beside it for the whole measurement (another
user's job on one of the cores). Ratios are to the quiet default (torch's threads, OpenMP's default policy).

    .venv/bin/python benchmarks/contention.py [--steps 30] [--out benchmarks/results/contention.md]

Run it on an otherwise idle machine: the point is what one extra process does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model, machine_line, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "contention.md"
CONFIGS = {
    "default (all threads, OpenMP default wait)": {},
    "all threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one thread": {"LOWBIT_BENCH_THREADS": "1"},
    "lowbit train's choice (idle cores)": {"LOWBIT_BENCH_THREADS": "auto"},
}

CHILD = r"""
import json, os, statistics, sys, time
import torch
import lowbit
from lowbit.models import build_model
if os.environ.get("LOWBIT_BENCH_THREADS") == "auto":
    from lowbit.config import Recipe
    from lowbit.run import choose_threads
    choose_threads(Recipe())
elif os.environ.get("LOWBIT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["LOWBIT_BENCH_THREADS"]))
steps = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
torch.manual_seed(0)
model = build_model("mobilenetv2")
cfg = lowbit.QuantConfig(weight=lowbit.QuantSpec(bits=4, granularity="channel"), act=lowbit.QuantSpec(bits=4),
                         first_last_bits=8)
lowbit.prepare(model, cfg, calib=[x])
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
times = []
for i in range(steps + 5):
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss.item()
    if i >= 5:
        times.append(time.perf_counter() - t)
print(json.dumps({"median_ms": 1000 * statistics.median(times), "threads": torch.get_num_threads()}))
"""


def _spin(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def measure(env_extra: dict[str, str], busy: bool, steps: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_extra)
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True) if busy else None
    if spinner is not None:
        spinner.start()
        time.sleep(0.5)
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=env, capture_output=True, text=True,
                             check=True, timeout=1800)  # fmt: skip
    finally:
        if spinner is not None:
            stop.set()
            spinner.join()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    results = {}
    for busy in (False, True):  # interleaved per condition, each configuration once per round
        for name, env in CONFIGS.items():
            results[(name, busy)] = measure(env, busy, args.steps)
            ms = results[(name, busy)]["median_ms"]
            print(f"{name:45s} {'busy' if busy else 'quiet':5s} {ms:.1f} ms", flush=True)
    base = results[(next(iter(CONFIGS)), False)]["median_ms"]
    rows = [[name, str(results[(name, False)]["threads"]),
             f"{results[(name, False)]['median_ms']:.1f}", f"{results[(name, False)]['median_ms'] / base:.2f}x",
             f"{results[(name, True)]['median_ms']:.1f}", f"{results[(name, True)]['median_ms'] / base:.2f}x"]
            for name in CONFIGS]  # fmt: skip
    head = ["configuration", "threads", "quiet ms / step", "vs quiet default", "busy ms / step", "vs quiet default"]
    text = "\n".join([
        "# QAT step time on a shared machine", "", f"{machine_line()} · CPU: {cpu_model()}", "",
        f"`python benchmarks/contention.py --steps {args.steps}`: median of {args.steps} MobileNetV2 W4A4 LSQ steps "
        "(batch 128) after 5 warm-up steps, each configuration in a fresh process; busy = one spinning Python "
        "process beside it. `lowbit train` now takes the last row's choice: the recipe's `threads`, else "
        "`OMP_NUM_THREADS`, else the cores other processes leave idle (sampled from /proc/stat for 0.25 s).",
        "", markdown_table(head, rows), "",
    ])  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
