"""Configuration: frozen dataclasses validated on construction, read from and written to YAML.

A recipe states only what differs from the defaults below. Unknown keys and invalid values raise
``ConfigError`` naming the key (as a dotted path), the value and what is allowed. ``a.b=c`` overrides
(from the command line) are applied to the raw mapping before validation, with values parsed as YAML.

Rules: ``Rule.weight`` / ``Rule.act`` are ``"inherit"`` (use the config's spec), ``None`` (do not
quantize) or a ``QuantSpec``. In YAML a rule's spec may list only the fields that differ from the
config's spec (``{match: "classifier", weight: {bits: 8}}``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from lowbit.errors import ConfigError
from lowbit.spec import GGUF_FORMATS, MAX_LENGTH, BinarySpec, QuantSpec
from lowbit.validate import (
    INHERIT,
    apply_overrides,
    build_dataclass,
    check_int,
    check_number,
    read_yaml,
    require_int,
    to_plain,
)
from lowbit.validate import check as _check

__all__ = [
    "BinarySpec", "QuantSpec", "LowRankSpec", "Rule", "QuantConfig", "DataConfig", "ModelConfig", "StageConfig",
    "TextConfig", "Recipe", "TASKS", "INHERIT", "load_recipe", "recipe_from_dict", "recipe_to_dict", "stage_hash",
    "require_int",
]  # fmt: skip

# Bounds that keep a run finite (see the notes of issue 12): a range-init grid search costs one fake-quant
# pass per candidate (the papers use 100); seeds fit every seeder lowbit calls (numpy's SeedSequence,
# torch.manual_seed); 10**9 steps is months of training, not an integer overflow.
MAX_SEED = 2**32 - 1
MAX_STEPS = 10**9
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000
MAX_THREADS = 1024
MAX_CALIB_BATCHES = 256  # calibration keeps every batch's activations in memory


SpecOrInherit = Union[QuantSpec, None, Literal["inherit"]]  # noqa: UP007

PHI_STORAGES = ("fixed_point8", "bf16", "fp32", "int")
LOWRANK_VARIANTS = ("lrqat", "qlora")


@dataclass(frozen=True)
class LowRankSpec:
    """Train a linear layer through low-rank adapters instead of its weight (LR-QAT, METHODS.md §2).

    ``variant``: ``lrqat`` puts the adapters inside the integer grid (``W = s·clip(round(Φ0 + (α/r)AB))``,
    merged exactly into integers); ``rank: 0`` with it trains the scales only. ``qlora`` is the baseline
    with frozen round-to-nearest integers and float adapters outside the grid. ``phi``: how the frozen
    ``Φ0`` is stored (``fixed_point8`` int8 Q(b).(8−b), ``bf16``, ``fp32``, or ``int`` packed at b bits).
    ``recompute``: rebuild the weight in the backward pass instead of keeping it (the paper's checkpointing).
    """

    rank: int = 32
    alpha: float = 1.0
    phi: str = "fixed_point8"
    variant: str = "lrqat"
    recompute: bool = True

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 0, 65_536, "an integer from 0 (scales only) to 65_536")
        alpha = check_number("alpha", self.alpha, 0, 1e6, "a number in (0, 1e6]", open_lo=True)
        object.__setattr__(self, "alpha", alpha)
        _check(self.phi in PHI_STORAGES, "phi", self.phi, f"one of {PHI_STORAGES}")
        _check(self.variant in LOWRANK_VARIANTS, "variant", self.variant, f"one of {LOWRANK_VARIANTS}")
        _check(
            self.variant != "qlora" or self.rank >= 1, "rank", self.rank, "an integer >= 1 with variant: qlora"
        )
        _check(isinstance(self.recompute, bool), "recompute", self.recompute, "true or false")


LowRankOrInherit = Union[LowRankSpec, None, Literal["inherit"]]  # noqa: UP007


@dataclass(frozen=True)
class Rule:
    """Per-layer override, matched by glob on module names; the first matching rule wins."""

    match: str
    weight: SpecOrInherit = INHERIT
    act: SpecOrInherit = INHERIT
    skip: bool = False
    lowrank: LowRankOrInherit = INHERIT

    def __post_init__(self) -> None:
        _check(isinstance(self.match, str) and self.match != "", "match", self.match, "a non-empty glob")
        _check(
            self.lowrank is None or self.lowrank == INHERIT or isinstance(self.lowrank, LowRankSpec),
            "lowrank", self.lowrank, "a LowRankSpec, None (train the weight) or 'inherit'",
        )  # fmt: skip
        for name in ("weight", "act"):
            v = getattr(self, name)
            _check(
                v is None or v == INHERIT or isinstance(v, QuantSpec),
                name,
                v,
                "a QuantSpec, None (not quantized) or 'inherit'",
            )
        _check(isinstance(self.skip, bool), "skip", self.skip, "true or false")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize: default weight and input-activation specs, rules, and the first/last layers.

    ``first_last_bits``: when set, the first and last quantized layers (in module order) get weights at
    that many bits, the first layer's input stays float and the last layer's input uses that many bits
    (the LSQ paper's setup), unless a rule matches them.

    ``lowrank``: train the quantized linear layers through low-rank adapters (LR-QAT and its baselines,
    ``LowRankSpec``); a rule may set or clear it per layer. ``freeze_unquantized``: parameters outside
    the quantized layers (embeddings, norms, an LLM's head) do not train, as in weight-only LLM QAT.

    ``embedding``: the grid of every ``nn.Embedding`` (null: they stay float), e.g. ``{format: q8_0}``; a
    head tied to a quantized embedding reads its integers (skip the head in the rules, as the LLM default
    does). The table trains in QAT; under ``freeze_unquantized`` it stays the pretrained one and only its
    scales learn (round-to-nearest with learned scales), as LR-QAT keeps the linears' weights frozen.
    """

    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, granularity="channel"))
    act: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, symmetric="auto"))
    rules: tuple[Rule, ...] = ()
    first_last_bits: int | None = None
    lowrank: LowRankSpec | None = None
    freeze_unquantized: bool = False
    embedding: QuantSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        emb = self.embedding
        _check(emb is None or isinstance(emb, QuantSpec), "embedding", emb, "null or a QuantSpec mapping")
        if emb is not None:
            _check(emb.binary is None, "embedding.binary", emb.binary, "null (an embedding table is not binary)")
            _check(emb.axis in (0, -2), "embedding.axis", emb.axis, "0: an embedding's scales run along its rows")
        for r in self.rules:
            _check(isinstance(r, Rule), "rules", r, "a list of Rule")
        if self.first_last_bits is not None:
            check_int("first_last_bits", self.first_last_bits, 1, 8, "null or an integer from 1 to 8")
        _check(
            self.lowrank is None or isinstance(self.lowrank, LowRankSpec), "lowrank", self.lowrank,
            "null or a LowRankSpec mapping (rank, alpha, phi, variant, recompute)",
        )  # fmt: skip
        fz = self.freeze_unquantized
        _check(isinstance(fz, bool), "freeze_unquantized", fz, "true or false")


@dataclass(frozen=True)
class DataConfig:
    """The dataset (classification: a name from ``lowbit.data.DATASETS``; causal_lm: a corpus,
    ``shakespeare``, ``kjv`` or ``file:PATH``) and its batch sizes."""

    name: str = "fashion_mnist"
    batch_size: int = 128
    eval_batch_size: int = 1000
    split_seed: int = 0
    train_subset: int | None = None  # use only the first N training images (quick runs, tests)
    test_subset: int | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name != "", "name", self.name, "a dataset or corpus name")
        for n in ("batch_size", "eval_batch_size"):
            check_int(n, getattr(self, n), 1, MAX_BATCH)
        check_int("split_seed", self.split_seed, 0, MAX_SEED)
        for n in ("train_subset", "test_subset"):
            v = getattr(self, n)
            if v is not None:
                check_int(n, v, 1, MAX_STEPS, f"null or an integer from 1 to {MAX_STEPS:_}")


@dataclass(frozen=True)
class ModelConfig:
    """The model: a name from ``lowbit.models`` (classification), or for causal_lm ``smollm2``,
    ``random-llama`` (a random LLaMA built from ``args``, with a byte-level tokenizer) or a local Hugging
    Face folder."""

    name: str = "mobilenetv2"
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name != "", "name", self.name, "a model name or folder")
        _check(isinstance(self.args, dict) and all(isinstance(k, str) for k in self.args), "args", self.args,
               "a mapping of argument names to values")  # fmt: skip


@dataclass(frozen=True)
class TextConfig:
    """What only causal language modelling needs: the corpus split, sequence length, evaluation windows.

    The training corpus (``data.name``) keeps its last ``heldout_fraction`` for perplexity;
    ``other_corpus`` is scored as a whole (a corpus the model never trains on). Perplexity is taken on
    ``eval_windows`` sliding windows of ``eval_window`` tokens. ``block_checkpoint`` recomputes each decoder
    block in the backward pass.
    """

    seq_len: int = 256
    heldout_fraction: float = 0.1
    other_corpus: str | None = "kjv"
    eval_windows: int = 16
    eval_window: int = 512
    block_checkpoint: bool = True

    def __post_init__(self) -> None:
        for n, lo, hi in (("seq_len", 2, MAX_LENGTH), ("eval_windows", 1, 100_000), ("eval_window", 2, MAX_LENGTH)):
            check_int(n, getattr(self, n), lo, hi)
        hf = self.heldout_fraction
        hf = check_number("heldout_fraction", hf, 0, 1, "a number in (0, 1)", open_lo=True, open_hi=True)
        object.__setattr__(self, "heldout_fraction", hf)
        _check(self.other_corpus is None or isinstance(self.other_corpus, str), "other_corpus", self.other_corpus,
               "null or a corpus name")  # fmt: skip
        _check(isinstance(self.block_checkpoint, bool), "block_checkpoint", self.block_checkpoint, "true or false")


DEVICE = re.compile(r"cpu|cuda(:(0|[1-9][0-9]{0,2}|10[01][0-9]|102[0-3]))?")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "linear")
TASKS = ("classification", "causal_lm")


@dataclass(frozen=True)
class StageConfig:
    """One training stage (float pre-training, or QAT).

    Length: ``steps`` when set, else ``epochs`` (may be fractional) of the task's batches; 0 means no
    training (QAT with 0 steps is round-to-nearest). Weights (or adapters) train with ``optimizer`` at
    ``lr`` under ``schedule`` (``cosine``; ``linear``: warm-up over the first ``warmup`` fraction, then
    linear decay to 0; ``constant``), quantizer scales with ``scale_optimizer`` at ``scale_lr``, constant
    unless ``schedule_scales``. ``grad_clip`` clips the global gradient norm. The task is evaluated every
    ``eval_every`` steps (0: at the end of each epoch) and at the end.
    """

    epochs: float = 1.0
    steps: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 5e-5
    schedule: str = "cosine"
    warmup: float = 0.0
    scale_optimizer: str = "adam"
    scale_lr: float = 1e-3
    schedule_scales: bool = False
    grad_clip: float | None = None
    eval_every: int = 0
    max_steps: int | None = None  # stop after this many steps (smoke runs); the schedule is unchanged

    def __post_init__(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        _check(self.scale_optimizer in OPTIMIZERS, "scale_optimizer", self.scale_optimizer, f"one of {OPTIMIZERS}")
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
        for n, hi in (("epochs", MAX_EPOCHS), ("lr", 100), ("scale_lr", 100), ("weight_decay", 1), ("momentum", 1)):
            # float: 3 and 3.0 are one config, one hash
            object.__setattr__(self, n, check_number(n, getattr(self, n), 0, hi, f"a number from 0 to {hi:_}"))
        wu = check_number("warmup", self.warmup, 0, 1, "a fraction in [0, 1)", open_hi=True)
        object.__setattr__(self, "warmup", wu)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, 1, MAX_STEPS, f"null or an integer from 1 to {MAX_STEPS:_}")
        if self.steps is not None:
            check_int("steps", self.steps, 0, MAX_STEPS, f"null (use epochs) or an integer from 0 to {MAX_STEPS:_}")
        check_int("eval_every", self.eval_every, 0, MAX_STEPS, f"an integer from 0 (each epoch) to {MAX_STEPS:_}")
        _check(isinstance(self.betas, list | tuple), "betas", self.betas, "two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(self.betas))
        _check(len(self.betas) == 2, "betas", list(self.betas), "two numbers in [0, 1)")
        for i, b in enumerate(self.betas):
            check_number(f"betas[{i}]", b, 0, 1, "two numbers in [0, 1)", open_hi=True)
        _check(isinstance(self.schedule_scales, bool), "schedule_scales", self.schedule_scales, "true or false")
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, 0, 1e6, "null or a number in (0, 1e6]", open_lo=True)


@dataclass(frozen=True)
class Recipe:
    """A whole run: task, data, model, float pre-training, quantization and QAT.

    ``task``: ``classification`` (images) or ``causal_lm`` (a pretrained language model on a text corpus:
    set ``text``; ``pretrain`` is skipped, the model is already trained).
    """

    name: str = "default"
    task: str = "classification"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(epochs=3, lr=0.1))
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(first_last_bits=8))
    calib_batches: int = 4
    # QAT: SGD at a lower lr than pre-training, scales by Adam at a small lr (1e-3 made W4A4 ~0.6 points
    # worse than 1e-4 or 1e-5 on the default recipe; see the closing notes of issue 2)
    qat: StageConfig = field(default_factory=lambda: StageConfig(epochs=2, lr=0.02, scale_lr=1e-4))
    methods: tuple[dict[str, Any], ...] = ()
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at the end of each epoch only)
    threads: int | None = None
    device: str = "cpu"
    text: TextConfig | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.methods, list | tuple), "methods", self.methods, "a list of {name: ..., ...} mappings")
        object.__setattr__(self, "methods", tuple(self.methods))
        _check(self.task in TASKS, "task", self.task, f"one of {TASKS}")
        _check(isinstance(self.name, str), "name", self.name, "a string")
        _check(isinstance(self.device, str) and DEVICE.fullmatch(self.device) is not None, "device",
               self.device, "cpu, cuda or cuda:N (N from 0 to 1023)")  # fmt: skip
        if self.task == "causal_lm" and self.text is None:
            object.__setattr__(self, "text", TextConfig())
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("calib_batches", self.calib_batches, 1, MAX_CALIB_BATCHES)
        check_int("checkpoint_every", self.checkpoint_every, 0, MAX_STEPS, f"an integer from 0 to {MAX_STEPS:_}")
        if self.threads is not None:
            allowed = f"null (torch's default) or an integer from 1 to {MAX_THREADS}"
            check_int("threads", self.threads, 1, MAX_THREADS, allowed)
        for m in self.methods:
            _check(isinstance(m, dict) and "name" in m, "methods", m, "a list of {name: ..., ...} mappings")


# What a causal_lm recipe starts from (weight-only LR-QAT of every linear but the head, the LR-QAT
# paper's optimizer: AdamW β = (0.9, 0.95), no weight decay, 10 % warm-up then linear decay for adapters
# and scales, clipping at 1.0). A recipe states only what differs from these.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal_lm": {
        "model": ModelConfig(name="smollm2"),
        "data": DataConfig(name="shakespeare", batch_size=1, eval_batch_size=4),
        "pretrain": StageConfig(epochs=0),
        "quant": QuantConfig(
            weight=QuantSpec(bits=4, granularity="channel", init="lp"),
            act=None,
            rules=(Rule(match="lm_head", skip=True),),
            lowrank=LowRankSpec(),
            freeze_unquantized=True,
        ),
        "qat": StageConfig(
            steps=100, optimizer="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, schedule="linear",
            warmup=0.1, scale_optimizer="adamw", scale_lr=1e-5, schedule_scales=True, grad_clip=1.0,
        ),  # fmt: skip
        "calib_batches": 1,
        "checkpoint_every": 25,
    }
}


def _with_format(spec: Any) -> Any:
    """A YAML spec naming a GGUF ``format``: the format's fields written out under the mapping's own, so they
    replace what the spec would inherit; a field the mapping sets to another value is left for
    ``QuantSpec`` to refuse, by name."""
    if not isinstance(spec, dict) or not isinstance(spec.get("format"), str) or spec["format"] not in GGUF_FORMATS:
        return spec  # no format, or one QuantSpec refuses
    return {**GGUF_FORMATS[spec["format"]], **spec}


def _build_quant(data: dict[str, Any], path: str, default: QuantConfig) -> QuantConfig:
    """QuantConfig over ``default``, where each rule's partial spec is merged over the config's own spec."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}={data!r} is not allowed: expected a mapping")
    data = {k: _with_format(v) if k in ("weight", "act", "embedding") else v for k, v in data.items()}
    if "rules" not in data:
        return build_dataclass(QuantConfig, data, path, inherit_from=default)
    rules_raw = data.pop("rules")
    base = build_dataclass(QuantConfig, data, path, inherit_from=default)
    if not isinstance(rules_raw, list):
        raise ConfigError(f"{path}.rules={rules_raw!r} is not allowed: expected a list of rules")
    rules = []
    for i, r in enumerate(rules_raw):
        rp = f"{path}.rules[{i}]"
        if isinstance(r, Rule):
            rules.append(r)
            continue
        if not isinstance(r, dict):
            raise ConfigError(f"{rp}={r!r} is not allowed: expected a mapping with 'match'")
        r = dict(r)
        unknown = set(r) - {"match", "weight", "act", "skip", "lowrank"}
        if unknown:
            raise ConfigError(
                f"unknown key {rp + '.' + sorted(unknown)[0]!r}: allowed keys are match, weight, act, skip, lowrank"
            )
        if "match" not in r:
            raise ConfigError(f"{rp}: missing 'match' (a glob on module names, e.g. 'features.0*')")
        for k, default in (("weight", base.weight), ("act", base.act)):
            if isinstance(r.get(k), dict):
                r[k] = build_dataclass(QuantSpec, _with_format(r[k]), f"{rp}.{k}", inherit_from=default)
        if isinstance(r.get("lowrank"), dict):
            r["lowrank"] = build_dataclass(LowRankSpec, r["lowrank"], f"{rp}.lowrank", inherit_from=base.lowrank)
        try:
            rules.append(Rule(**r))
        except ConfigError as e:
            raise ConfigError(f"{rp}: {e}") from None
    return dataclasses.replace(base, rules=tuple(rules))


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build and validate a ``Recipe`` from a (YAML-loaded) mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe={data!r} is not allowed: expected a mapping")
    data = dict(data)
    task = data.get("task", "classification")
    _check(task in TASKS, "task", task, f"one of {TASKS}")
    base = Recipe(task=task, **TASK_DEFAULTS.get(task, {}))
    quant = _build_quant(data.pop("quant"), "quant", base.quant) if "quant" in data else None
    recipe = build_dataclass(Recipe, data, "", inherit_from=base)
    return dataclasses.replace(recipe, quant=quant) if quant is not None else recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain data (round-trips through ``recipe_from_dict``).

    Sections the recipe's task does not use are left out: ``text`` for classification, ``pretrain``
    for a causal LM (it starts pretrained), so a resolved config shows only what the run used.
    """
    out = to_plain(recipe)
    if not isinstance(recipe, Recipe):
        return out
    unused = {"classification": ("text",), "causal_lm": ("pretrain",)}.get(recipe.task, ())
    return {k: v for k, v in out.items() if k not in unused}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (only what differs from the defaults), apply overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist: pass a YAML file or a name from `lowbit recipes`")
    data = read_yaml(p, f"recipe {str(path)!r}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", p.stem)
    return recipe_from_dict(apply_overrides(data, overrides or []))


def stage_hash(*parts: Any) -> str:
    """A short stable hash of plain data (used to cache float checkpoints by recipe)."""
    blob = json.dumps(to_plain(parts), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
