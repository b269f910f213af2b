"""`lowbit train` on an LLM recipe: run dir, metrics, integer export, eval/generate, resume, bad input.

Everything runs on a random 2-layer LLaMA with the byte tokenizer and small text files written here,
so nothing is downloaded and no corpus package is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.config import load_recipe
from lowbit.errors import ConfigError

pytest.importorskip("transformers")

from lowbit.cli import main  # noqa: E402
from lowbit.data.text import sliding_window_perplexity, split_tokens, tokenize_corpus  # noqa: E402
from lowbit.llm import LMTrainer  # noqa: E402
from lowbit.llm_train import byte_tokenizer, run_llm  # noqa: E402
from lowbit.train import run  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llm-tiny.yaml"
WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "went",
    "to",
    "castle",
    "while",
    "knight",
    "rode",
    "over",
    "hill",
    "far",
    "away",
]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    folder = tmp_path_factory.mktemp("text")
    paths = []
    for name, n in (("train.txt", 6000), ("other.txt", 1500)):
        idx = torch.randint(len(WORDS), (n,), generator=g).tolist()
        (folder / name).write_text(" ".join(WORDS[i] for i in idx) + "\n")
        paths.append(folder / name)
    return paths[0], paths[1]


def _recipe(corpora: tuple[Path, Path], *extra: str):  # noqa: ANN202
    train, other = corpora
    return load_recipe(
        RECIPE,
        [f"llm.corpus=file:{train}", f"llm.other_corpus=file:{other}", "llm.steps=6", "llm.eval_every=3",
         "llm.checkpoint_every=3", "llm.eval_windows=2", "llm.seq_len=32", "llm.batch_size=2", "threads=1", *extra],
    )  # fmt: skip


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = byte_tokenizer()
    text = "Thou art — naïve 😀\nline two\t end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text


def test_llm_run_writes_everything_and_the_integer_model_scores_the_same(
    corpora: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(corpora)
    run_dir = tmp_path / "run"
    summary = run(recipe, run_dir, progress=False)  # the generic entry point dispatches
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "model.json", "report.html"):
        assert (run_dir / f).is_file(), f
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("float", 0), ("qat", 0), ("qat", 3), ("qat", 6), ("final", 6)]
    assert all("other_perplexity" in r for r in rows)
    # merge is exact: the integer model's perplexity is the fake-quant model's after training
    assert rows[-1]["test_perplexity"] == pytest.approx(rows[-2]["test_perplexity"], rel=1e-6)
    assert summary["quant_metric"] == rows[-1]["test_perplexity"] and summary["steps"] == 6
    assert summary["tokens"] == 6 * 2 * 32 and summary["quant_bytes"] < summary["float_bytes"]
    assert summary["step0_metric"] == rows[1]["test_perplexity"]
    assert summary["quant_metric"] < summary["step0_metric"], "training lowered the held-out perplexity"
    # the saved file reloads as an HF LLaMA with integer linears and gives the same perplexity
    model = lowbit.load(run_dir / "model.safetensors")
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tokenize_corpus(corpora[0].read_text(), byte_tokenizer())
    _, held = split_tokens(ids, recipe.llm.heldout_fraction)
    ppl = sliding_window_perplexity(model, held, window=recipe.llm.eval_window, max_windows=2, batch_size=4)
    assert ppl == pytest.approx(summary["quant_metric"], rel=1e-6)
    # the CLI: eval prints the same number, generate prints text from the integer model
    assert main(["eval", str(run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["integer_perplexity"] == pytest.approx(summary["quant_metric"], rel=1e-6)
    assert main(["generate", str(run_dir), "the king", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert main(["export", str(run_dir), "--format", "onnx"]) != 0
    assert "ONNX export of LLMs is not supported" in capsys.readouterr().err


def test_interrupted_llm_run_resumes_to_the_same_result(corpora: tuple[Path, Path], tmp_path: Path) -> None:
    recipe = _recipe(corpora)
    whole = run_llm(recipe, tmp_path / "whole", progress=False)
    real_step, calls = LMTrainer.train_step, {"n": 0}

    def crash_at_step_5(self: LMTrainer, ids: torch.Tensor) -> float:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, ids)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LMTrainer, "train_step", crash_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            run_llm(recipe, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run_llm(recipe, tmp_path / "cut", resume=True, progress=False)
    assert resumed["quant_metric"] == whole["quant_metric"]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert rows == ref, "the resumed run's log equals the uninterrupted one's"


@pytest.mark.parametrize("method", ["rtn", "scales_only", "full_qat"])
def test_other_methods_run_and_export(corpora: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    summary = run_llm(_recipe(corpora, f"llm.method={method}", "llm.eval_every=0"), tmp_path / method, progress=False)
    assert summary["method"] == method
    if method == "rtn":
        assert summary["steps"] == 0 and summary["quant_metric"] == pytest.approx(summary["step0_metric"], rel=1e-6)
    else:
        assert summary["steps"] == 6
    model = lowbit.load(tmp_path / method / "model.safetensors")
    assert any(type(m).__name__ == "IntLinear" for m in model.modules())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("llm.method=qlora", r"method='qlora'.*one of"),
        ("llm.model=/no/such/folder", "allowed smollm2, random-llama"),
        ("llm.corpus=wikitext", "corpus='wikitext': allowed kjv, shakespeare or file:PATH"),
        ("llm.granularity=group", "group_size"),
        ("llm.targets=['*nothing']", "match no module"),
        ("llm.rank=1000", "rank=1000"),
    ],
)
def test_bad_llm_config_is_a_clear_error(corpora: tuple[Path, Path], tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_llm(_recipe(corpora, override), tmp_path / "bad", progress=False)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(
    corpora: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lowbit.checkpoint import load_checkpoint
    from lowbit.errors import TrainingError

    real_step, calls = LMTrainer.train_step, {"n": 0}

    def nan_at_step_5(self: LMTrainer, ids: torch.Tensor) -> float:
        calls["n"] += 1
        return float("nan") if calls["n"] == 5 else real_step(self, ids)

    monkeypatch.setattr(LMTrainer, "train_step", nan_at_step_5)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5 .*holds step 3"):
        run_llm(_recipe(corpora), tmp_path / "nan", progress=False)
    assert load_checkpoint(tmp_path / "nan" / "checkpoints" / "llm.safetensors")["step"] == 3
    assert not (tmp_path / "nan" / "summary.json").exists()
