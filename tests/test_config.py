"""Configuration: validation messages, dict/YAML round trips, unknown keys, overrides, rule inheritance."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

import lowbit
from lowbit import ConfigError, QuantConfig, QuantSpec, Rule
from lowbit.config import (
    INHERIT,
    DataConfig,
    ModelConfig,
    Recipe,
    StageConfig,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from lowbit.validate import apply_overrides

# -- QuantSpec validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field,value",
    [
        ({"bits": 0}, "bits", "0"),
        ({"bits": 9}, "bits", "9"),
        ({"bits": 2.5}, "bits", "2.5"),
        ({"bits": True}, "bits", "True"),
        ({"granularity": "row"}, "granularity", "'row'"),
        ({"granularity": "channel", "group_size": 32}, "group_size", "32"),
        ({"group_size": 64}, "group_size", "64"),
        ({"granularity": "group"}, "group_size", "None"),
        ({"granularity": "group", "group_size": 0}, "group_size", "0"),
        ({"init": "percentile"}, "init", "'percentile'"),
        ({"p": -1.0}, "p", "-1.0"),
        ({"num_candidates": 0}, "num_candidates", "0"),
        ({"symmetric": "yes"}, "symmetric", "'yes'"),
        ({"signed": 1}, "signed", "1"),
    ],
)
def test_quant_spec_errors_name_field_and_value(kwargs: dict, field: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        QuantSpec(**kwargs)
    msg = str(e.value)
    assert f"{field}={value}" in msg
    assert "allowed" in msg or "unless" in msg or "when" in msg


def test_quant_spec_valid_edges() -> None:
    assert QuantSpec(bits=1).bits == 1
    assert QuantSpec(bits=8).bits == 8
    assert QuantSpec(granularity="group", group_size=128).group_size == 128
    assert QuantSpec(bits=4).replace(bits=2) == QuantSpec(bits=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantSpec().bits = 3  # type: ignore[misc]


def test_other_config_errors() -> None:
    with pytest.raises(ConfigError, match="first_last_bits=9"):
        QuantConfig(first_last_bits=9)
    with pytest.raises(ConfigError, match="rules="):
        QuantConfig(rules=("fc",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="match=''"):
        Rule(match="")
    with pytest.raises(ConfigError, match="weight=8"):
        Rule(match="fc", weight=8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="optimizer='lbfgs'"):
        StageConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="batch_size=0"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match="calib_batches=0"):
        Recipe(calib_batches=0)


# -- round trips --------------------------------------------------------------------------------------


def _rich_recipe() -> Recipe:
    weight = QuantSpec(bits=3, granularity="group", group_size=32, init="lp", p=3.5)
    return Recipe(
        name="rich",
        seed=3,
        data=DataConfig(batch_size=64, train_subset=512),
        model=ModelConfig(name="resnet", args={"width": 8, "blocks": [1, 2]}),
        pretrain=StageConfig(epochs=0.5, optimizer="adamw", lr=1e-3),
        quant=QuantConfig(
            weight=weight,
            act=QuantSpec(bits=4, symmetric=False, signed=False),
            rules=(
                Rule(match="classifier", weight=weight.replace(bits=8), act=INHERIT),
                Rule(match="features.0.*", weight=INHERIT, act=None),
                Rule(match="features.9*", skip=True),
                Rule(match="*.conv.3", weight=None),
            ),
            first_last_bits=None,
        ),
        calib_batches=3,
        qat=StageConfig(epochs=2, lr=0.01, max_steps=7, schedule="constant"),
        methods=({"name": "dampen", "lambda": 0.1, "anneal": [0.25, 1.0]}, {"name": "freeze", "threshold": 0.02}),
        checkpoint_every=10,
        threads=2,
    )


@pytest.mark.parametrize("recipe", [Recipe(), _rich_recipe()], ids=["default", "rich"])
def test_dict_round_trip(recipe: Recipe) -> None:
    d = recipe_to_dict(recipe)
    assert recipe_from_dict(d) == recipe
    # plain data only (what YAML can hold)
    text = yaml.safe_dump(d, sort_keys=False)
    assert recipe_from_dict(yaml.safe_load(text)) == recipe
    # and idempotent
    assert recipe_to_dict(recipe_from_dict(d)) == d


def test_yaml_with_partial_rule_specs(tmp_path) -> None:
    text = """
name: partial
quant:
  weight: {bits: 2, granularity: channel, init: minmax}
  act: {bits: 4}
  rules:
    - {match: "classifier", weight: {bits: 8}}
    - {match: "features.0*", act: null}
    - {match: "features.3", act: {symmetric: false}}
methods:
  - {name: dampen, lambda: 0.1}
"""
    path = tmp_path / "partial.yaml"
    path.write_text(text)
    r = load_recipe(path)
    weight = QuantSpec(bits=2, granularity="channel", init="minmax")
    act = QuantSpec(bits=4)
    assert r.quant.weight == weight and r.quant.act == act
    classifier, first, third = r.quant.rules
    # the rule's partial spec inherits every other field from the config's weight spec
    assert classifier.weight == weight.replace(bits=8)
    assert classifier.act == INHERIT
    assert first.act is None and first.weight == INHERIT
    assert third.act == act.replace(symmetric=False)
    assert r.methods == ({"name": "dampen", "lambda": 0.1},)
    # the resolved recipe round-trips through YAML text
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe_to_dict(r))))
    assert again == r


def test_rule_act_null_means_not_quantized_in_prepare() -> None:
    import torch
    from torch import nn

    r = recipe_from_dict(
        {"quant": {"first_last_bits": None, "rules": [{"match": "1", "act": None, "weight": {"bits": 8}}]}}
    )
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lowbit.prepare(model, r.quant, calib=[torch.randn(3, 4)])
    assert model[1].input_quantizer is None
    assert int(model[1].weight_quantizer.bits) == 8
    assert model[1].weight_quantizer.granularity == r.quant.weight.granularity
    assert int(model[0].input_quantizer.bits) == r.quant.act.bits


# -- unknown keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,dotted",
    [
        ({"epochz": 1}, "epochz"),
        ({"qat": {"epochz": 2}}, "qat.epochz"),
        ({"data": {"batchsize": 2}}, "data.batchsize"),
        ({"quant": {"wieght": {"bits": 2}}}, "quant.wieght"),
        ({"quant": {"weight": {"bitz": 2}}}, "quant.weight.bitz"),
        ({"quant": {"rules": [{"match": "fc", "bitz": 2}]}}, "quant.rules[0].bitz"),
        ({"quant": {"rules": [{"match": "a"}, {"match": "fc", "weight": {"bitz": 2}}]}}, "quant.rules[1].weight.bitz"),
        ({"quant": {"rules": [{"match": "fc", "act": {"granularty": "channel"}}]}}, "quant.rules[0].act.granularty"),
    ],
)
def test_unknown_keys_name_the_dotted_path(data: dict, dotted: str) -> None:
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(data)
    msg = str(e.value)
    assert "unknown key" in msg
    assert f"'{dotted}'" in msg


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"qat": {"lr": "fast"}}, "qat.lr='fast'"),
        ({"qat": {"optimizer": "lbfgs"}}, "optimizer='lbfgs'"),
        ({"quant": {"weight": {"bits": 9}}}, "bits=9"),
        ({"quant": {"rules": [{"weight": {"bits": 2}}]}}, "quant.rules[0]"),
        ({"quant": {"rules": "fc"}}, "quant.rules='fc'"),
        ({"quant": {"rules": [{"match": "fc", "skip": "yes"}]}}, "skip='yes'"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"methods": [{"lambda": 1}]}, "methods"),
        ("not a mapping", "recipe="),
    ],
)
def test_invalid_values(data: object, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(data)  # type: ignore[arg-type]
    assert needle in str(e.value)


# -- partial sections keep the other defaults -----------------------------------------------------------


def test_partial_sections_keep_their_defaults() -> None:
    default = Recipe()
    r = recipe_from_dict({"qat": {"epochs": 2}, "pretrain": {"lr": 0.2}, "quant": {"weight": {"bits": 3}}})
    assert r.qat == dataclasses.replace(default.qat, epochs=2.0)
    assert r.pretrain == dataclasses.replace(default.pretrain, lr=0.2)
    assert r.quant.weight == default.quant.weight.replace(bits=3)
    assert r.quant.act == default.quant.act
    assert r.quant.first_last_bits == default.quant.first_last_bits
    assert recipe_from_dict({}) == default
    assert recipe_from_dict({"quant": {"act": None}}).quant.act is None


# -- overrides ----------------------------------------------------------------------------------------


def test_overrides() -> None:
    base = {"name": "x", "qat": {"epochs": 1, "lr": 0.01}, "quant": {"rules": [{"match": "fc"}]}}
    out = apply_overrides(
        base,
        ["qat.epochs=2", "quant.weight.bits=3", "quant.rules.0.match=head", "data.train_subset=100", "threads=null"],
    )
    assert base["qat"]["epochs"] == 1  # the input is not modified
    assert out["qat"] == {"epochs": 2, "lr": 0.01}
    assert out["quant"]["weight"] == {"bits": 3}
    assert out["quant"]["rules"][0]["match"] == "head"
    r = recipe_from_dict(out)
    assert r.qat.epochs == 2.0 and r.qat.lr == 0.01
    assert r.quant.weight.bits == 3
    assert r.data.train_subset == 100 and r.threads is None
    # later overrides win; values are YAML
    out2 = apply_overrides({}, ["qat.epochs=2", "qat.epochs=0.5", "quant.act=null", "name='7'"])
    assert out2 == {"qat": {"epochs": 0.5}, "quant": {"act": None}, "name": "7"}


@pytest.mark.parametrize(
    "override",
    ["qat.epochs", "qat.epochs=[1,", "name.first=3", "quant.rules.5.match=x", "quant.rules.x.match=y"],
)
def test_malformed_overrides(override: str) -> None:
    base = {"name": "x", "quant": {"rules": [{"match": "fc"}]}}
    with pytest.raises(ConfigError) as e:
        apply_overrides(base, [override])
    assert "override" in str(e.value)


def test_override_of_unknown_key_fails_at_validation() -> None:
    out = apply_overrides({}, ["qat.epochz=2"])
    with pytest.raises(ConfigError, match="'qat.epochz'"):
        recipe_from_dict(out)


def test_load_recipe_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("qat: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(lst)
    ok = tmp_path / "tiny.yaml"
    ok.write_text("qat: {epochs: 1}\n")
    r = load_recipe(ok, ["qat.epochs=3"])
    assert r.name == "tiny" and r.qat.epochs == 3.0
