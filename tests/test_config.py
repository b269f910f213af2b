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
    act = QuantSpec(bits=4, symmetric="auto")  # QuantConfig's default activation grid, merged with bits: 4
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


# -- values that would crash or hang a run are refused where they enter -----------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("qat.epochs=.inf", "qat.epochs=inf is not allowed: expected a finite number"),
        ("qat.epochs=.nan", "qat.epochs=nan is not allowed"),
        ("qat.epochs=1000000", "qat.epochs=1000000.0 is not allowed: a number from 0 to 100_000"),
        ("qat.lr=.inf", "qat.lr=inf"),
        ("pretrain.scale_lr=.nan", "pretrain.scale_lr=nan"),
        ("qat.momentum=-.inf", "qat.momentum=-inf"),
        ("qat.momentum=2", "qat.momentum=2.0 is not allowed: a number from 0 to 1"),
        ("qat.weight_decay=.nan", "qat.weight_decay=nan"),
        ("qat.warmup=.nan", "qat.warmup=nan"),
        ("qat.betas=[.nan, 0.9]", "qat.betas[0]=nan"),
        ("qat.betas=[0.9, 1]", "qat.betas[1]=1.0 is not allowed: two numbers in [0, 1)"),
        ("qat.grad_clip=.inf", "qat.grad_clip=inf is not allowed: expected a finite number or null"),
        ("qat.steps=10000000000", "qat.steps=10000000000 is not allowed: null (use epochs) or an integer from 0"),
        ("qat.max_steps=0", "qat.max_steps=0"),
        ("qat.eval_every=true", "qat.eval_every=True is not allowed: expected an integer"),
        ("seed=9223372036854775808", "seed=9223372036854775808 is not allowed: an integer from 0 to 4_294_967_295"),
        ("seed=-1", "seed=-1 is not allowed"),
        ("seed=1" + "0" * 75, "seed=1" + "0" * 75 + " is not allowed: an integer from 0 to 4_294_967_295"),
        ("device=" + "x" * 300, "device='" + "x" * 74 + "...x' is not allowed"),  # a long value, cut short
        ("seed=1" + "0" * 400, "0...0': the value: '10000000000000000000'... has more than 256 bits"),
        ("data.split_seed=4294967296", "data.split_seed=4294967296"),
        ("threads=-1", "threads=-1 is not allowed: null (torch's default) or an integer from 1 to 1024"),
        ("threads=0", "threads=0 is not allowed"),
        ("threads=1000000", "threads=1000000 is not allowed"),
        ("threads=true", "threads=True is not allowed"),
        ("device=tpu", "device='tpu' is not allowed: cpu, cuda or cuda:N (N from 0 to 1023)"),
        ("device=cuda:-1", "device='cuda:-1'"),
        ("device=cuda:x", "device='cuda:x'"),
        ("device=cuda:01", "device='cuda:01'"),
        ("device='cpu '", "device='cpu '"),
        ("quant.weight.num_candidates=1000000000", "num_candidates=1000000000 is not allowed: an integer from 1 to"),
        ("quant.weight.p=.inf", "quant.weight.p=inf"),
        ("quant.weight.p=1000", "quant.weight.p=1000.0 is not allowed: a number in (0, 100]"),
        ("quant.act.axis=99", "quant.act.axis=99"),
        ("quant.weight={granularity: group, group_size: 10000000}", "quant.weight.group_size=10000000"),
        ("quant.lowrank={alpha: .inf}", "quant.lowrank.alpha=inf"),
        ("quant.lowrank={rank: 1000000}", "quant.lowrank.rank=1000000"),
        ("quant.rules=[{match: fc, weight: {p: .nan}}]", "quant.rules[0].weight.p=nan"),
        ("data.batch_size=1000001", "data.batch_size=1000001 is not allowed: an integer from 1 to 1_000_000"),
        ("data.eval_batch_size=false", "data.eval_batch_size=False"),
        ("data.train_subset=10000000000", "data.train_subset=10000000000"),
        ("calib_batches=1000000", "calib_batches=1000000 is not allowed: an integer from 1 to 256"),
        ("checkpoint_every=-1", "checkpoint_every=-1"),
        ("model.name=''", "model.name='' is not allowed"),
        ("task=causal_lm", None),  # the causal-LM defaults pass; text.* below
    ],
)
def test_values_that_would_crash_or_hang_a_run(override: str, needle: str | None) -> None:
    if needle is None:
        recipe_from_dict(apply_overrides({}, [override]))
        return
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(apply_overrides({}, [override]))
    assert needle in str(e.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("text.heldout_fraction=.nan", "text.heldout_fraction=nan"),
        ("text.heldout_fraction=1", "text.heldout_fraction=1.0 is not allowed: a number in (0, 1)"),
        ("text.eval_windows=1000000000", "text.eval_windows=1000000000"),
        ("text.seq_len=2000000", "text.seq_len=2000000"),
        ("text.other_corpus=[1]", "text.other_corpus=[1]"),
    ],
)
def test_text_values_are_bounded(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(apply_overrides({"task": "causal_lm"}, [override]))
    assert needle in str(e.value)


def test_direct_construction_checks_the_same_bounds() -> None:
    import math

    from lowbit.config import LowRankSpec, TextConfig

    for make, needle in [
        (lambda: StageConfig(epochs=math.inf), "epochs=inf"),
        (lambda: StageConfig(lr=math.nan), "lr=nan"),
        (lambda: StageConfig(betas=(math.nan, 0.9)), "betas[0]=nan"),
        (lambda: StageConfig(betas=0.9), "betas=0.9"),  # type: ignore[arg-type]
        (lambda: StageConfig(grad_clip=math.inf), "grad_clip=inf"),
        (lambda: StageConfig(epochs=10**400), "epochs=1000000"),
        (lambda: Recipe(seed=2**63), "seed=9223372036854775808"),
        (lambda: Recipe(threads=0), "threads=0"),
        (lambda: Recipe(device="cuda:1024"), "device='cuda:1024'"),
        (lambda: Recipe(calib_batches=True), "calib_batches=True"),
        (lambda: Recipe(methods="x"), "methods='x'"),  # type: ignore[arg-type]
        (lambda: QuantSpec(num_candidates=10**9), "num_candidates=1000000000"),
        (lambda: QuantSpec(p=math.nan), "p=nan"),
        (lambda: LowRankSpec(alpha=math.nan), "alpha=nan"),
        (lambda: TextConfig(heldout_fraction=math.nan), "heldout_fraction=nan"),
        (lambda: DataConfig(batch_size=True), "batch_size=True"),
        (lambda: DataConfig(split_seed=-1), "split_seed=-1"),
        (lambda: ModelConfig(args={1: 2}), "args={1: 2}"),  # type: ignore[dict-item]
        (lambda: Recipe(seed=16**5000), "seed=(an integer of 20_001 bits)"),  # too long to print
    ]:
        with pytest.raises(ConfigError) as e:
            make()
        assert needle in str(e.value) and "not allowed" in str(e.value)
    # the edges themselves are fine
    r = Recipe(seed=2**32 - 1, threads=1024, device="cuda:1023", calib_batches=256, checkpoint_every=10**9)
    assert r.seed == 2**32 - 1 and Recipe(device="cuda").device == "cuda"
    assert StageConfig(steps=10**9, epochs=100_000, lr=100, momentum=1, warmup=0.99).steps == 10**9
    assert QuantSpec(num_candidates=10_000, p=100, axis=-8).num_candidates == 10_000


def test_method_settings_take_finite_numbers_only() -> None:
    from lowbit.methods import build_methods

    with pytest.raises(ConfigError, match=r"methods\[0\].lambda_final=inf is not allowed: expected a finite number"):
        build_methods([{"name": "oscillation_dampening", "lambda_final": float("inf")}], total_steps=10)
    with pytest.raises(ConfigError, match=r"methods\[0\].momentum=nan"):
        build_methods([{"name": "oscillation_tracking", "momentum": float("nan")}], total_steps=10)
