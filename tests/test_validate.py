"""lowbit.validate's YAML: plain data only, within limits, every refusal a ConfigError with its line and column."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from lowbit.config import load_recipe, recipe_from_dict
from lowbit.errors import ConfigError
from lowbit.validate import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, apply_overrides, parse_yaml

# "billion laughs": 9 levels of 9 aliases, 9**9 (387 million) strings once expanded (e.g. by the JSON copy
# that apply_overrides makes); PyYAML's own loader builds it as shared lists and lets it through
BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_an_alias_bomb_is_refused_at_once_without_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    tracemalloc.start()
    t0 = time.perf_counter()
    for load in (lambda: load_recipe(path), lambda: apply_overrides({}, [f"name={BOMB.replace(chr(10), ' ')}"])):
        with pytest.raises(ConfigError, match=r"anchors and aliases .* are not allowed.*\(line 1, column 4\)"):
            load()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 5 * 2**20  # refused at the first anchor: about a millisecond, a few KiB


@pytest.mark.parametrize(
    "value",
    ["!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2024-01-01", "!!omap [a: 1]", "!!pairs [a: 1]",
     "!!python/object/apply:os.system [echo]", "!!python/name:os.system", "!custom 1", "!<tag:x.org,2024:y> 1"],
)  # fmt: skip
def test_tags_are_refused_with_file_line_and_column(tmp_path: Path, value: str) -> None:
    path = tmp_path / "tagged.yaml"
    path.write_text(f"# a recipe\nqat: {{epochs: 1}}\nname: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"recipe {str(path)!r}: the tag ") and "is not allowed" in msg and "(line 3, column 7)" in msg
    with pytest.raises(ConfigError, match=r"^override 'name=.*': the value: the tag .* \(line 1, column 1\)"):
        apply_overrides({}, [f"name={value}"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &x [1, *x]", r"anchors and aliases"),  # refers to itself
        ("a: &x 1", r"anchors and aliases"),
        ("a: !!merge {b: 1}", r"the tag !!merge"),
        ("a: !!int abc", r"'abc' is not a number YAML can read .*\(line 1, column 4\)"),
        ("a: 1" + "0" * 5000, r"is not a number YAML can read"),  # beyond Python's int-from-text limit
        ("a: 0x" + "f" * 4000, r"'0xffffffffffffffffff'... has more than 256 bits"),
        ("1: 2", r"the key '1' is not allowed: mapping keys are names"),
        ("? [1]\n: 2", r"the key \[...\] is not allowed"),
        ("[" * 100_000, r"nesting deeper than 16 levels"),
        ("a: " + "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1), r"nesting deeper than 16 levels"),
        ("a: [" + ",".join(["1"] * MAX_YAML_NODES) + "]", r"more than 10_000 values"),
        ("a: '" + "x" * MAX_YAML_BYTES + "'", r"at most 262_144 are allowed"),
        ("a: [1,", r"is not valid YAML: expected the node content"),
        ("a: 1\n---\nb: 2", r"is not valid YAML: but found another document \(line 2, column 1\)"),
        ("a: \x00", r"is not valid YAML: unacceptable character #x0000"),
    ],
)
def test_what_parse_yaml_refuses(text: str, message: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        parse_yaml(text, "recipe 'x.yaml'")
    assert time.perf_counter() - t0 < 5.0  # about 0.2 s at most alone; a hang is what this catches


def test_plain_yaml_still_reads() -> None:
    deepest = MAX_YAML_DEPTH - 2  # the top mapping and the leaf count as levels
    text = "a: " + "[" * deepest + "1" + "]" * deepest
    assert parse_yaml(text, "x")["a"] == [[[[[[[[[[[[[[1]]]]]]]]]]]]]]
    data = parse_yaml("d: 2024-01-01\nt: 2001-12-14t21:59:43.10-05:00\n'<<': {a: 1}\ne: =\nf: .inf\ng: 0x10\nh: ~", "x")
    assert data == {"d": "2024-01-01", "t": "2001-12-14t21:59:43.10-05:00", "<<": {"a": 1}, "e": "=",
                    "f": float("inf"), "g": 16, "h": None}  # fmt: skip
    assert parse_yaml("<<: {a: 1}", "x") == {"<<": {"a": 1}}  # a merge key is only a key: unknown to recipes
    assert parse_yaml("a: !!str 5\nb: !!int '7'", "x") == {"a": "5", "b": 7}
    assert parse_yaml("", "x") is None and parse_yaml("# only a comment", "x") is None
    assert recipe_from_dict(parse_yaml("name: 2024-01-01", "x")).name == "2024-01-01"


def test_files_that_are_not_recipes(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:  # 1 GiB, sparse: refused after reading MAX_YAML_BYTES + 1 bytes
        f.truncate(2**30)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"recipe '.*big.yaml' is larger than 262_144 bytes"):
        load_recipe(big)
    assert time.perf_counter() - t0 < 1.0
    blob = tmp_path / "model.safetensors"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"recipe '.*model.safetensors' is not UTF-8 text \(byte 128"):
        load_recipe(blob)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 9 is not\)"):
        load_recipe(latin)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"qat: {epochs: 1}\x00\n")
    with pytest.raises(ConfigError, match=r"recipe '.*nul.yaml' is not valid YAML: unacceptable character #x0000"):
        load_recipe(nul)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path)  # a folder
    utf8 = tmp_path / "utf8.yaml"
    utf8.write_text("name: café\n", encoding="utf-8")
    assert load_recipe(utf8).name == "café"


def test_overrides_of_odd_data_and_odd_keys() -> None:
    with pytest.raises(ConfigError, match=r"recipe=\[1\] is not allowed: expected a mapping"):
        apply_overrides([1], [])  # type: ignore[arg-type]
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ConfigError, match="refers to itself"):
        apply_overrides(loop, [])
    with pytest.raises(ConfigError, match="plain data"):
        apply_overrides({"a": object()}, [])
    with pytest.raises(ConfigError, match=r"'²' is not a valid list index"):
        apply_overrides({"quant": {"rules": [{"match": "fc"}]}}, ["quant.rules.²=x"])
    with pytest.raises(ConfigError, match=r"override 12 is not allowed: write key=value"):
        apply_overrides({}, [12])  # type: ignore[list-item]
    long = "name=" + "x" * (MAX_YAML_BYTES + 1)
    with pytest.raises(ConfigError, match=r"^override 'name=x+\.\.\.x': the value is 262_145 characters long"):
        apply_overrides({}, [long])
