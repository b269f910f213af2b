"""Fuzzing what a user can type: YAML recipes, ``key=value`` overrides, sweep axes and model arguments.

Whatever goes in, lowbit either builds a recipe or raises ``ConfigError``: never another exception, never a
hang. Hypothesis runs derandomized (the same examples every run, no example database), with small sizes,
so the whole file takes a few seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.config import Recipe, load_recipe, recipe_from_dict, recipe_to_dict
from lowbit.errors import ConfigError
from lowbit.models import build_model
from lowbit.sweep import parse_grid
from lowbit.validate import apply_overrides, parse_yaml

FUZZ = settings(
    derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _dotted_keys(cls: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass, sections included (``qat``, ``qat.epochs``, ...)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        inner = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        for a in inner[:1]:
            out += _dotted_keys(a, f"{key}.")
    return out


KEYS = _dotted_keys(Recipe) + [
    "quant.weight.bits", "quant.act.num_candidates", "quant.lowrank.alpha", "quant.rules.0.match",
    "quant.rules.0.weight.bits", "methods.0.name", "model.args.width", "model.args.depth", "qat..lr", "", "a.b.c",
    "qat.epochs.x", "quant.rules.9", "quant.rules.²", "seed.0",
]  # fmt: skip
EDGE_NUMBERS = [0, 1, -1, 2, 8, 9, 256, 10**6, 10**9, 2**32, 2**63, 2**64, -(2**63), 10**400, 0.5, 1e-9, 1e300,
                math.inf, -math.inf, math.nan, True, False]  # fmt: skip
EDGE_TEXT = [".inf", "-.inf", ".nan", "1e9", "2024-01-01", "0x7fffffffffffffff", "0b101", "190:20:30", "~", "null",
             "yes", "on", "[]", "{}", "[1, [2, [3]]]", "{a: 1}", "!!binary aGk=", "!!set {a}", "!!timestamp 2001-12-14",
             "!!python/object/apply:os.system [ls]", "!custom x", "&a 1", "*a", "<<: {a: 1}", "=", "'", '"', "[",
             "{", ":", "- 1", "!!int abc", "!!float x", "!!str 5", "cuda:-1", "cuda:x", "tpu", "\t", "\x00", "é",
             "a" * 300]  # fmt: skip

scalars = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(["classification", "causal_lm", "cpu", "cuda", "cuda:0", "mlp", "resnet", "sgd", "adamw",
                     "channel", "group", "tensor", "mse", "lp", "minmax", "inherit", "synthetic", "lrqat"]),
)  # fmt: skip
names = st.one_of(st.sampled_from([k.rsplit(".", 1)[-1] for k in KEYS if k]), st.text(max_size=6))
plain = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value).removesuffix("\n...\n").strip()


def _nest(key: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``a.b`` (list indices left as keys: what a careless recipe holds)."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _sane(value: Any, path: str = "") -> None:
    """What a built recipe promises the run: finite numbers, integers a seeder or a tensor size can take."""
    if isinstance(value, dict):
        for k, v in value.items():
            if f"{path}{k}" not in ("model.args", "methods"):  # checked by the model and the methods
                _sane(v, f"{path}{k}.")
    elif isinstance(value, list):
        for v in value:
            _sane(v, path)
    elif isinstance(value, float):
        assert math.isfinite(value), path
    elif isinstance(value, int) and not isinstance(value, bool):
        assert -(2**63) <= value < 2**63, path


def _ok_or_config_error(fn: Any, *args: Any) -> None:
    with contextlib.suppress(ConfigError):
        out = fn(*args)
        if isinstance(out, Recipe):
            _sane(recipe_to_dict(out))


@FUZZ
@given(st.sampled_from(KEYS), plain, st.sampled_from([None, "classification", "causal_lm"]))
def test_any_plain_data_builds_or_is_a_config_error(key: str, value: Any, task: str | None) -> None:
    data = _nest(key, value) if key else {"": value}
    if task is not None:
        data.setdefault("task", task)
    _ok_or_config_error(recipe_from_dict, data)


@FUZZ
@given(st.sampled_from(KEYS), st.one_of(st.sampled_from(EDGE_TEXT), st.sampled_from(EDGE_NUMBERS).map(_yaml_scalar),
                                        st.text(max_size=20)))  # fmt: skip
def test_any_override_builds_or_is_a_config_error(key: str, raw: str) -> None:
    def apply() -> Recipe:
        return recipe_from_dict(apply_overrides({"quant": {"rules": [{"match": "fc"}]}}, [f"{key}={raw}"]))

    _ok_or_config_error(apply)
    _ok_or_config_error(parse_grid, [f"{key}={raw}", f"{key}x=[{raw}, 1]"])


def _yaml_text(data: Any) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True, default_flow_style=False)
    except (yaml.YAMLError, ValueError):
        return str(data)


@FUZZ
@given(plain, st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(EDGE_TEXT + [" ", "\n", "\n  ", "#"])),
                       max_size=4))  # fmt: skip
def test_any_yaml_file_loads_or_is_a_config_error(tmp_path_factory: pytest.TempPathFactory, data: Any,
                                                  edits: list[tuple[int, str]]) -> None:  # fmt: skip
    text = _yaml_text(data)
    for pos, piece in edits:  # splice YAML syntax, tags, anchors and control characters into it
        pos %= len(text) + 1
        text = text[:pos] + piece + text[pos:]
    _ok_or_config_error(parse_yaml, text, "fuzz")
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _ok_or_config_error(load_recipe, path)
    _ok_or_config_error(load_recipe, path, [f"qat.epochs={text[:40]}"])


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_load_or_are_a_config_error(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_bytes(blob)
    _ok_or_config_error(load_recipe, path)


EDGE_ARGS = [-1, 0, 1, 2, 3, 10**6, 10**30, 2.5, math.nan, math.inf, True, None, "3", [1], [], [1, 0], [1] * 7,
             [64, 64], (1, 1)]  # fmt: skip
ARG_NAMES = ["width", "depth", "blocks", "num_classes", "in_channels", "image_size", "width_mult", "expand_ratio",
             "dropout", "widht"]  # fmt: skip
model_args = st.dictionaries(
    st.sampled_from(ARG_NAMES),
    st.one_of(st.sampled_from(EDGE_ARGS), st.integers(-2, 4), st.lists(st.integers(-1, 3), max_size=3)),
    max_size=3,
)


@FUZZ
@given(st.sampled_from(["mlp", "resnet", "mobilenetv2", "vgg"]), model_args)
def test_any_model_arguments_build_or_are_a_config_error(name: str, args: dict[str, Any]) -> None:
    _ok_or_config_error(lambda: build_model(name, **args))
