"""benchmarks/common.py: the markdown table, interleaved timing, the peak-RSS reset, the float cache key."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lowbit.cli import find_recipe
from lowbit.config import load_recipe, stage_hash

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
_spec = importlib.util.spec_from_file_location("benchmarks_common", _PATH)
assert _spec is not None and _spec.loader is not None
common = importlib.util.module_from_spec(_spec)
sys.modules["benchmarks_common"] = common
_spec.loader.exec_module(common)


def test_markdown_table_exact() -> None:
    out = common.markdown_table(["toolkit", "acc"], [("lowbit", "90.10"), ("a|b", "9.5")], align="lr")
    assert out.splitlines() == [
        "| toolkit |   acc |",
        "|---------|------:|",
        "| lowbit  | 90.10 |",
        "| a\\|b    |   9.5 |",
    ]


def test_markdown_table_rejects_ragged_rows_and_bad_align() -> None:
    with pytest.raises(ValueError, match="2 cells"):
        common.markdown_table(["a", "b", "c"], [(1, 2)])
    with pytest.raises(ValueError, match="align"):
        common.markdown_table(["a", "b"], [(1, 2)], align="lc")


def test_interleaved_median_times_rotates_and_skips_warmup() -> None:
    now = [0.0]
    calls: list[str] = []
    cost = {"a": [5.0, 1.0, 2.0, 3.0], "b": [9.0, 10.0, 30.0, 20.0], "c": [7.0, 4.0, 4.0, 4.0]}

    def make(name: str):  # noqa: ANN202 - a test callable
        def step() -> None:
            now[0] += cost[name][sum(c == name for c in calls)]
            calls.append(name)

        return step

    medians = common.interleaved_median_times({n: make(n) for n in cost}, warmup=1, repeats=3, clock=lambda: now[0])
    # Every round calls each contender once, starting one further along each time.
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    # The first (warm-up) call of each is excluded: medians of the last three costs.
    assert medians == {"a": 2.0, "b": 20.0, "c": 4.0}


def test_interleaved_median_times_rejects_no_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        common.interleaved_median_times({"a": lambda: None}, warmup=0, repeats=0)


def test_reset_peak_rss_forgets_earlier_peaks() -> None:
    blob = b"\x01" * (96 << 20)  # 96 MB actually written, so resident
    high = common.peak_rss_mb()
    del blob
    if not common.reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    after = common.peak_rss_mb()
    assert after < high - 48
    assert after >= common.rss_mb() - 1


def test_float_recipe_shares_the_cache_of_lowbit_train_default() -> None:
    """The benchmark's float model is the one ``lowbit train default`` trains and caches (same key)."""
    default = load_recipe(find_recipe("default"))
    ours = common.float_recipe("mobilenetv2", {}, default.pretrain.epochs, default.seed)
    key = stage_hash(ours.data, ours.model, ours.pretrain, ours.seed)
    assert key == stage_hash(default.data, default.model, default.pretrain, default.seed)
    quick = common.float_recipe("mobilenetv2", {}, default.pretrain.epochs, default.seed, train_subset=512)
    assert stage_hash(quick.data, quick.model, quick.pretrain, quick.seed) != key
