"""`lowbit train` on a causal_lm recipe (the one runner): run dir, metrics, integer export, eval/generate/export,
resume, methods on LR-QAT layers, bad input.

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
from lowbit.llm.models import byte_tokenizer  # noqa: E402
from lowbit.run import run  # noqa: E402
from lowbit.tasks.text import TextTask  # noqa: E402

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
        [f"data.name=file:{train}", f"text.other_corpus=file:{other}", "qat.steps=6", "qat.eval_every=3",
         "checkpoint_every=3", "text.eval_windows=2", "text.seq_len=32", "data.batch_size=2", "threads=1", *extra],
    )  # fmt: skip


def test_llm_run_writes_everything_and_the_integer_model_scores_the_same(
    corpora: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(corpora)
    run_dir = tmp_path / "run"
    summary = run(recipe, run_dir, progress=False)
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "model.json", "report.html"):
        assert (run_dir / f).is_file(), f
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [(r["stage"], r["step"]) for r in rows]
    assert stages == [("float", 0), ("direct", 0), ("qat", 3), ("qat", 6), ("final", 6)]
    assert all("other_perplexity" in r for r in rows)
    # convert is exact: the integer model's perplexity is the fake-quant model's after training
    assert rows[-1]["test_perplexity"] == pytest.approx(rows[-2]["test_perplexity"], rel=1e-6)
    assert summary["quant_metric"] == rows[-1]["test_perplexity"] and summary["steps"] == 6
    assert summary["tokens_per_step"] == 2 * 32 and summary["quant_bytes"] < summary["float_bytes"]
    assert summary["direct_metric"] == rows[1]["test_perplexity"]
    assert summary["quant_metric"] < summary["direct_metric"], "training lowered the held-out perplexity"
    # every key ARCHITECTURE promises for every run
    for key in ("recipe", "dataset", "model", "float_metric", "direct_metric", "quant_metric", "metric_name",
                "weight_bits", "act_bits", "float_bytes", "quant_bytes", "train_seconds", "methods"):  # fmt: skip
        assert key in summary, key
    assert summary["metric_name"] == "perplexity" and summary["act_bits"] == 32 and summary["weight_bits"] == 4
    # the saved file reloads as an HF LLaMA with integer linears and gives the same perplexity
    model = lowbit.load(run_dir / "model.safetensors")
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tokenize_corpus(corpora[0].read_text(), byte_tokenizer())
    _, held = split_tokens(ids, recipe.text.heldout_fraction)
    ppl = sliding_window_perplexity(model, held, window=recipe.text.eval_window, max_windows=2, batch_size=4)
    assert ppl == pytest.approx(summary["quant_metric"], rel=1e-6)
    # the CLI: eval prints the same number, generate prints text from the integer model
    assert main(["eval", str(run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["integer"]["perplexity"] == pytest.approx(summary["quant_metric"], rel=1e-6)
    assert main(["generate", str(run_dir), "the king", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert main(["export", str(run_dir), "--format", "onnx"]) == 2
    assert "ONNX export of causal language models is not supported" in capsys.readouterr().err
    assert main(["export", str(run_dir)]) == 0  # the default format: the run's integer model
    assert str(run_dir / "model.safetensors") in capsys.readouterr().out
    # the report speaks of perplexity, not accuracy points or oscillations, and shows only what the run used
    page = (run_dir / "report.html").read_text()
    assert "perplexity" in page and "points" not in page and "fashion_mnist" not in page
    assert (run_dir / "plots" / "perplexity.png").is_file() and not (run_dir / "plots" / "accuracy.png").exists()


def test_interrupted_llm_run_resumes_to_the_same_result(corpora: tuple[Path, Path], tmp_path: Path) -> None:
    recipe = _recipe(corpora)
    whole = run(recipe, tmp_path / "whole", progress=False)
    real_loss, calls = TextTask.loss, {"n": 0}

    def crash_at_step_5(self: TextTask, model: torch.nn.Module, batch: torch.Tensor):  # noqa: ANN202
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(self, model, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextTask, "loss", crash_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            run(recipe, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run(recipe, tmp_path / "cut", resume=True, progress=False)
    assert resumed["quant_metric"] == whole["quant_metric"]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert rows == ref, "the resumed run's log equals the uninterrupted one's"
    # the checkpoint holds what training changes, not the frozen embeddings
    from lowbit.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "cut" / "checkpoints" / "qat.safetensors")["model"]
    assert "model.embed_tokens.weight" not in saved and any(k.endswith("lora_a") for k in saved)
    # resuming with another method list is refused, naming the key that differs
    other = _recipe(corpora, "methods=[{name: oscillation_tracking}]")
    with pytest.raises(lowbit.FormatError, match=r"config.yaml differs from this recipe at methods"):
        run(other, tmp_path / "cut", resume=True, progress=False)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("rtn", ["qat.steps=0", "quant.lowrank=null"]),
        ("scales_only", ["quant.lowrank.rank=0"]),
        ("full_qat", ["quant.lowrank=null"]),
        ("qlora", ["quant.lowrank.variant=qlora"]),
        ("lrqat_int", ["quant.lowrank.phi=int"]),
    ],
)
def test_other_layer_kinds_run_and_export(
    corpora: tuple[Path, Path], tmp_path: Path, name: str, overrides: list[str]
) -> None:
    summary = run(_recipe(corpora, "qat.eval_every=0", *overrides), tmp_path / name, progress=False)
    if name == "rtn":
        assert summary["steps"] == 0 and summary["quant_metric"] == pytest.approx(summary["direct_metric"], rel=1e-6)
        assert summary["trainable_parameters"] > 0  # weights and scales of the linears could train; none did
    else:
        assert summary["steps"] == 6
    model = lowbit.load(tmp_path / name / "model.safetensors")
    assert any(type(m).__name__ == "IntLinear" for m in model.modules())
    assert summary["quant_metric"] == pytest.approx(summary["qat_metric"], rel=1e-6)  # convert is exact


OSCILLATION = {
    "oscillation_tracking": "{name: oscillation_tracking, momentum: 0.5}",
    "oscillation_freezing": "{name: oscillation_freezing, momentum: 0.5, threshold_start: 0.2, threshold_final: 0.2, "
    "start: 0.0}",
}


@pytest.mark.parametrize("method", sorted(OSCILLATION))
def test_oscillation_methods_run_on_an_lrqat_recipe(corpora: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    run_dir = tmp_path / method
    summary = run(_recipe(corpora, f"methods=[{OSCILLATION[method]}]", "qat.lr=0.2"), run_dir, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    osc = [r["oscillation"] for r in rows if r["stage"] == "qat"]
    linears = 2 * (4 * 64 * 64 // 2 + 128 * 64 * 3)  # random-llama: q, o 64×64, k, v 32×64 (2 kv heads), MLP 3×
    assert len(osc) == 2 and osc[-1]["tracked"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) or linears
    assert osc[-1]["oscillating"] + osc[-1]["frozen"] > 0, "LR-QAT integers flip back and forth too"
    if method == "oscillation_freezing":
        assert osc[-1]["frozen"] > 0
    assert summary["methods"] == [method]
    assert summary["quant_metric"] == pytest.approx(summary["qat_metric"], rel=1e-6)  # frozen ints convert exactly


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.name=/no/such/folder", "allowed smollm2, random-llama"),
        ("data.name=wikitext", "data.name='wikitext': allowed kjv, shakespeare or file:PATH"),
        ("quant.weight.granularity=group", "group_size"),
        ("quant.rules=[{match: '*nothing', skip: true}]", "matches no quantizable layer"),
        ("quant.lowrank.rank=1000", "rank=1000"),
        ("quant.lowrank.variant=lsq", "variant='lsq'"),
        ("methods=[{name: oscillation_dampening}]", "cannot run on layer .*no latent weight"),
        ("methods=[{name: resiliency}]", "cannot run on layer .*no float weight"),
    ],
)
def test_bad_llm_config_is_a_clear_error(corpora: tuple[Path, Path], tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run(_recipe(corpora, override), tmp_path / "bad", progress=False)


def test_an_encoder_is_refused_not_scored(corpora: tuple[Path, Path], tmp_path: Path) -> None:
    """A BERT folder is not a causal LM: a clear error, never a perplexity from a random head."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"holds BertModel, not a causal language model"):
        run(_recipe(corpora, f"model.name={folder}"), tmp_path / "bert-run", progress=False)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(
    corpora: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lowbit.checkpoint import load_checkpoint
    from lowbit.errors import TrainingError

    real_loss, calls = TextTask.loss, {"n": 0}

    def nan_at_step_5(self: TextTask, model: torch.nn.Module, batch: torch.Tensor):  # noqa: ANN202
        calls["n"] += 1
        loss, out = real_loss(self, model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), out

    monkeypatch.setattr(TextTask, "loss", nan_at_step_5)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4 .*last good checkpoint"):
        run(_recipe(corpora), tmp_path / "nan", progress=False)
    assert load_checkpoint(tmp_path / "nan" / "checkpoints" / "qat.safetensors")["step"] == 3
    assert not (tmp_path / "nan" / "summary.json").exists()
