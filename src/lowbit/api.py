"""``prepare`` and ``convert``: walk the modules, match rules, swap layers, report the layer table.

``prepare(model, config, calib)`` replaces every ``nn.Linear`` / ``nn.Conv2d`` (unless a rule skips it)
by a quantized layer kind, in place, reusing the original parameters; creates every quantizer's state;
initialises weight ranges from the weights and activation ranges from the calibration batches. After it
returns, an optimizer can be built: nothing is created later. The kind comes from ``LAYER_KINDS``:
``QuantLinear`` / ``QuantConv2d``, or, where the config (or a rule) sets ``lowrank``, the LR-QAT layer
or the QLoRA-style baseline (``lowbit.methods.lrqat``).

``convert(model)`` returns a model of integer modules whose eval outputs equal the fake-quant model's,
through ``CONVERTERS``: one entry per layer kind (the LR-QAT merge is the low-rank layer's).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lowbit.config import INHERIT, LowRankSpec, QuantConfig, QuantSpec, Rule
from lowbit.errors import ConfigError
from lowbit.export.intmodules import INT_LAYERS, IntConv2d, IntEmbedding, IntLinear, IntTiedHead
from lowbit.methods.lrqat import LOWRANK_KINDS, LowRankQuantLinear, QLoRALinear, convert_lowrank, convert_qlora
from lowbit.quant.calibrate import init_range
from lowbit.quant.embedding import QuantEmbedding, QuantTiedHead
from lowbit.quant.modules import QUANT_MODULES, QuantConv2d, QuantLinear
from lowbit.quant.modules import quantized_layers as fake_quant_layers
from lowbit.quant.quantizer import Quantizer

__all__ = ["prepare", "convert", "layer_table", "quantized_layers", "calibrate", "LAYER_KINDS", "CONVERTERS"]

# (float module type, lowrank variant or None) -> quantized layer kind: the one place that says what lowbit
# can quantize and into what
LAYER_KINDS: dict[tuple[type[nn.Module], str | None], Any] = {
    (nn.Linear, None): QuantLinear,
    (nn.Conv2d, None): QuantConv2d,
    (nn.Embedding, None): QuantEmbedding,  # through quant.embedding, not the rules
    **{(nn.Linear, variant): kind for variant, kind in LOWRANK_KINDS.items()},
}

# quantized layer kind -> its converter to integer modules
CONVERTERS: dict[type[nn.Module], Callable[[Any], nn.Module]] = {
    QuantLinear: IntLinear.from_quant,
    QuantConv2d: IntConv2d.from_quant,
    QuantEmbedding: IntEmbedding.from_quant,
    LowRankQuantLinear: convert_lowrank,
    QLoRALinear: convert_qlora,
}

Plan = dict[str, tuple[QuantSpec | None, QuantSpec | None, LowRankSpec | None]]

log = logging.getLogger(__name__)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    kinds = tuple(CONVERTERS)
    for name, mod in model.named_modules():
        if isinstance(mod, kinds):
            raise ConfigError(f"module {name!r} is already quantized: call lowbit.prepare once per model")
        if type(mod) in QUANT_MODULES:
            out.append((name, mod))
    return out


def _embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, IntEmbedding | QuantEmbedding):
            raise ConfigError(f"module {name!r} is already quantized: call lowbit.prepare once per model")
        if type(mod) is nn.Embedding:
            out.append((name, mod))
    return out


def _quantize_embeddings(model: nn.Module, embeddings: list[tuple[str, nn.Module]], spec: QuantSpec | None) -> None:
    """Swap each ``nn.Embedding`` for a ``QuantEmbedding`` and each float head tied to one (the same weight
    parameter) for a ``QuantTiedHead`` that reads its integers; a head quantized on its own is refused."""
    if spec is None or not embeddings:
        return
    tied: dict[int, tuple[str, QuantEmbedding]] = {}
    for name, mod in embeddings:
        try:
            new = QuantEmbedding.from_float(mod, spec)  # type: ignore[arg-type]
        except ValueError as e:
            raise ConfigError(f"layer {name!r}: {e}") from None
        model.set_submodule(name, new)
        tied[id(new.weight)] = (name, new)
    for name, mod in list(model.named_modules()):
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or id(w) not in tied or isinstance(mod, QuantEmbedding):
            continue
        ename, emb = tied[id(w)]
        if type(mod) is not nn.Linear or mod.weight.shape != emb.weight.shape:
            raise ConfigError(
                f"layer {name!r} shares its weight with the embedding {ename!r}, which quant.embedding quantizes: "
                f"skip it with a rule ({{match: {name!r}, skip: true}}) and it reads the embedding's integers"
            )
        model.set_submodule(name, QuantTiedHead(emb, mod.bias, ename))


def _resolve(spec: Any, default: Any) -> Any:
    return default if spec == INHERIT else spec


def _plan(names: list[str], config: QuantConfig) -> Plan:
    """Layer name -> (weight spec, act spec, lowrank) for the layers that will be swapped."""
    for i, rule in enumerate(config.rules):
        if not any(fnmatch.fnmatchcase(n, rule.match) for n in names):
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ConfigError(
                f"rules[{i}].match={rule.match!r} matches no quantizable layer: candidates are {shown}"
            )
    plan: Plan = {}
    unruled: list[str] = []
    for name in names:
        rule: Rule | None = next((r for r in config.rules if fnmatch.fnmatchcase(name, r.match)), None)
        if rule is None:
            plan[name] = (config.weight, config.act, config.lowrank)
            unruled.append(name)
        elif not rule.skip:
            plan[name] = (
                _resolve(rule.weight, config.weight),
                _resolve(rule.act, config.act),
                _resolve(rule.lowrank, config.lowrank),
            )
    fl = config.first_last_bits
    swapped = list(plan)  # the first and last *quantized* layers, skipped ones not counted
    if fl is not None and swapped:
        first, last = swapped[0], swapped[-1]
        # first_last_bits puts them on the ordinary integer grid (not binary, nor stretched, which at 8 bits
        # would export at 9)
        ordinary = {"bits": fl, "binary": None, "stretched": False}
        if first in unruled:
            w, _, lr = plan[first]
            plan[first] = (w.replace(**ordinary) if w else None, None, lr)
        if last in unruled and last != first:
            w, a, lr = plan[last]
            last_act = a.replace(**ordinary) if a else None
            plan[last] = (w.replace(**ordinary) if w else None, last_act, lr)
    return plan


def _layer_kind(name: str, mod: nn.Module, weight: QuantSpec | None, lowrank: LowRankSpec | None) -> Any:
    variant = None if lowrank is None else lowrank.variant
    kind = LAYER_KINDS.get((type(mod), variant))
    if kind is None:
        allowed = sorted(t.__name__ for t, v in LAYER_KINDS if v == variant)
        raise ConfigError(
            f"layer {name!r}: lowrank (variant {variant!r}) applies to {', '.join(allowed)} layers, "
            f"not {type(mod).__name__}: add a rule with lowrank: null for it"
        )
    if lowrank is not None and weight is None:
        raise ConfigError(f"layer {name!r}: lowrank needs a quantized weight, but its weight spec is null")
    if lowrank is not None and weight is not None and weight.offset != "integer":
        raise ConfigError(f"layer {name!r}: lowrank (LR-QAT) merges on grids with an integer zero point; "
                          f"weight.offset={weight.offset!r} (format q4_1) is not supported there yet")  # fmt: skip
    return kind


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized (fake-quant, of every kind) or integer layers of ``model`` in module order."""
    fake = {id(m) for _, m in fake_quant_layers(model)}
    return [(n, m) for n, m in model.named_modules() if id(m) in fake or isinstance(m, INT_LAYERS)]


def _fmt(q: Quantizer | None) -> str:
    if q is None:
        return "float"
    g = q.granularity + (f"/{q.group_size}" if q.granularity == "group" else "")
    return f"{int(q.bits)}b {'sym' if q.symmetric else 'asym'}{'' if bool(q.signed) else ' unsigned'} {g}"


def layer_table(model: nn.Module) -> str:
    """A plain-text table: layer, type, weight spec, input spec."""
    rows = [("layer", "type", "weight", "input")]
    for name, mod in quantized_layers(model):
        wq = getattr(mod, "weight_quantizer", None)
        if wq is None and hasattr(mod, "qweight"):
            rows.append((name, type(mod).__name__, f"int{mod.qweight.weight_bits}", _fmt(mod.input_quantizer)))
            continue
        rows.append((name, type(mod).__name__, _fmt(wq), _fmt(mod.input_quantizer)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        return batch  # type: ignore[return-value]  # e.g. tokenized inputs for LLMs: passed as **kwargs
    raise ConfigError(
        f"calib batch of type {type(batch).__name__} is not allowed: use tensors, (inputs, targets) tuples, "
        "or dicts of model keyword arguments"
    )


@torch.no_grad()
def calibrate(model: nn.Module, calib: Iterable[Any]) -> int:
    """Initialise every input quantizer's range from the inputs it sees on ``calib`` batches.

    Weight quantizers stay active (activations see quantized weights); input quantizers pass their
    input through unchanged while recording it. Returns the number of batches used.
    """
    act_qs = [m.input_quantizer for _, m in quantized_layers(model) if m.input_quantizer is not None]
    if not act_qs:
        return 0
    was_training = model.training
    model.eval()
    for q in act_qs:
        q.observed = []
    n = 0
    try:
        for batch in calib:
            x = _first_tensor(batch)
            if isinstance(x, dict):
                model(**x)
            else:
                model(x)
            n += 1
        if n == 0:
            raise ConfigError("calib is empty: pass at least one batch of inputs to calibrate activations")
        for q in act_qs:
            seen = q.observed or []
            if not seen:  # layer not reached by forward (unused branch): keep the default range
                log.warning("an input quantizer saw no data during calibration; its scale stays 1.0")
                continue
            if q.granularity == "tensor":
                data = torch.cat([t.reshape(-1) for t in seen])
            else:
                data = torch.cat([t.movedim(1, 0).reshape(t.shape[1], -1) for t in seen], dim=1).movedim(0, 1)
            init_range(q, data)
    finally:
        for q in act_qs:
            q.observed = None
        model.train(was_training)
    return n


def prepare(
    model: nn.Module, config: QuantConfig | None = None, calib: Iterable[Any] | None = None
) -> nn.Module:
    """Swap quantizable layers for quantized ones (in place) and initialise every range.

    ``calib`` is an iterable of input batches (tensors, ``(inputs, targets)`` or keyword dicts); it is
    required when activations are quantized.
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config={type(config).__name__} is not allowed: pass a lowbit.QuantConfig")
    cands = _candidates(model)
    embeddings = _embeddings(model) if config.embedding is not None else []
    if not cands and not embeddings:
        raise ConfigError(
            f"{type(model).__name__} has no quantizable layer: lowbit quantizes "
            f"{', '.join(t.__name__ for t in QUANT_MODULES)} modules"
        )
    plan = _plan([n for n, _ in cands], config)
    needs_calib = any(a is not None for _, a, _ in plan.values())
    if needs_calib and calib is None:
        raise ConfigError(
            "calib=None is not allowed when activations are quantized: pass calib=[batch, ...] "
            "(a few training batches), or set act=None"
        )
    if "" in plan:
        raise ConfigError("the model itself is a single layer: wrap it in nn.Sequential to quantize it")
    for name, mod in cands:
        if name not in plan:
            continue
        w, a, lowrank = plan[name]
        kind = _layer_kind(name, mod, w, lowrank)
        try:
            new = kind.from_float(mod, w, a, lowrank)
        except ConfigError as e:
            raise ConfigError(f"layer {name!r}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"layer {name!r}: {e}") from None
        model.set_submodule(name, new)
    _quantize_embeddings(model, embeddings, config.embedding)
    if config.freeze_unquantized:
        keep = {id(p) for _, m in fake_quant_layers(model) for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        for _, m in fake_quant_layers(model):  # a quantized table stays the pretrained one, like LR-QAT's
            if isinstance(m, QuantEmbedding):  # frozen weights; its scales learn
                m.weight.requires_grad_(False)
    if needs_calib:
        assert calib is not None
        calibrate(model, calib)
    log.info("lowbit.prepare: %d layers quantized\n%s", len(plan), layer_table(model))
    return model


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A model with integer modules (``IntLinear``, ``IntConv2d``) in place of the quantized ones.

    The result is in eval mode; its outputs equal ``model.eval()``'s. ``model`` itself is left unchanged
    unless ``inplace=True``.
    """
    if not fake_quant_layers(model):
        raise ConfigError("convert needs a model returned by lowbit.prepare: it has no quantized layer")
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    for name, mod in fake_quant_layers(out):
        converter = CONVERTERS.get(type(mod))
        if converter is None:
            raise ConfigError(f"layer {name!r}: no converter for {type(mod).__name__} (known: {_names(CONVERTERS)})")
        out.set_submodule(name, converter(mod))
    for name, mod in list(out.named_modules()):
        if isinstance(mod, QuantTiedHead):
            emb = out.get_submodule(mod.embedding_name)
            assert isinstance(emb, IntEmbedding), f"{name!r} is tied to {mod.embedding_name!r}, not converted"
            out.set_submodule(name, IntTiedHead(emb, mod.bias, mod.embedding_name))
    return out


def _names(table: dict[type, Any]) -> str:
    return ", ".join(t.__name__ for t in table)
