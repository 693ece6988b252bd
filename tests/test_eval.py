"""`ham-mlx eval`: perplexity through the caches against a full-sequence forward computed here,
the ONNX runner against MLX, needle-in-a-haystack prompts and scoring, MQAR, the CLI end to end."""

import json
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from ham_mlx.eval import MLXRunner, OnnxRunner, mqar_accuracy, needle_retrieval, perplexity
from ham_mlx.eval.haystack import haystack_lines
from ham_mlx.eval.niah import accuracy_table, make_sample
from ham_mlx.model_io import default_model_path, load
from ham_mlx.presets import init_model


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load(default_model_path())
    model.cast(mx.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def text_ids(bundled):
    _, tokenizer = bundled
    return np.array(tokenizer.encode("\n".join(haystack_lines()[:80]), add_bos=True)[:301])


def full_forward_nll(model, ids):
    """Mean NLL of ids[1:] from one forward pass over the whole sequence, and each HAM layer's
    admitted fraction at the trained τ."""
    scores = []
    logits = np.array(model(mx.array(ids[None, :-1]), scores=scores)[0].astype(mx.float32))
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(ids.size - 1), ids[1:]].mean()
    kept = [float(mx.mean(s >= m.threshold)) for s, m in zip(scores, model.ham_layers)]
    return nll, kept


@pytest.mark.parametrize("chunk", [1000, 64, 37])
def test_ppl_through_caches_equals_full_forward(bundled, text_ids, chunk):
    model, _ = bundled
    r = perplexity(MLXRunner(model), text_ids, chunk=chunk)
    nll, kept = full_forward_nll(model, text_ids)
    assert r["tokens"] == 300
    assert r["nats_per_token"] == pytest.approx(nll, rel=2e-4)
    assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-3)
    assert r["kv_fraction"] == pytest.approx(kept, abs=1 / 300 + 1e-9)
    assert 0 < min(r["kv_fraction"]) and max(r["kv_fraction"]) < 0.5  # the trained τ ≈ 0.1


def test_ppl_threshold_control_changes_the_fraction(bundled, text_ids):
    model, _ = bundled
    every = perplexity(MLXRunner(model, {"threshold": -1e9}), text_ids, chunk=128)
    assert every["kv_fraction"] == [1.0] * 4
    trained = perplexity(MLXRunner(model), text_ids, chunk=128)
    assert every["nats_per_token"] != trained["nats_per_token"]


def test_ppl_refuses_one_token(bundled):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(MLXRunner(bundled[0]), [5])


def test_onnx_ppl_matches_mlx(tmp_path):
    from ham_mlx.export import export_onnx
    from ham_mlx.export.runtime import load as load_onnx

    folder = init_model(tmp_path / "m", "tiny", seed=3)
    model, tokenizer = load(folder)
    ids = np.array(tokenizer.encode("\n".join(haystack_lines()[:30]), add_bos=True)[:200])
    scores = []
    model(mx.array(ids[None]), scores=scores)
    tau = [float(np.median(np.array(s))) for s in scores]  # about half of the tokens admitted
    export_onnx(folder, tmp_path / "onnx", threshold=tau, report=False)
    onnx_model, _ = load_onnx(tmp_path / "onnx")
    a = perplexity(MLXRunner(model, {"threshold": tau}), ids, chunk=64)
    b = perplexity(OnnxRunner(onnx_model), ids, chunk=64)
    assert b["nats_per_token"] == pytest.approx(a["nats_per_token"], rel=1e-4)
    assert b["kv_fraction"] == pytest.approx(a["kv_fraction"], abs=2 / 199)
    assert all(0.3 < f < 0.7 for f in a["kv_fraction"])


@pytest.mark.parametrize("task", ["single", "multikey", "passkey"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_prompt_holds_the_needle_at_its_depth(bundled, task, depth):
    _, tokenizer = bundled
    prompt, value = make_sample(task, 300, depth, tokenizer, np.random.default_rng(1))
    n = len(tokenizer.encode(prompt, add_bos=True))
    assert 200 <= n <= 300
    body = prompt.split("\n")[1:-1]  # intro line ... question line
    where = [i for i, line in enumerate(body) if value in line]
    assert len(where) == 1 and prompt.count(value) == (2 if task == "passkey" else 1)
    assert abs(where[0] / (len(body) - 1) - depth) <= 0.15
    assert ("pass key" in prompt) == (task == "passkey")
    if task == "multikey":
        assert prompt.count("special magic numbers for") == 1 + 3  # the needle and 3 others


@pytest.mark.parametrize("task", ["single", "multikey", "passkey"])
def test_niah_refuses_a_length_shorter_than_the_task_text(bundled, task):
    _, tokenizer = bundled
    with pytest.raises(ValueError, match=f"niah {task}: a context of 64 tokens cannot hold"):
        make_sample(task, 64, 0.5, tokenizer, np.random.default_rng(1))


def test_niah_runs_and_scores_honestly(bundled):
    model, tokenizer = bundled
    r = needle_retrieval(MLXRunner(model), tokenizer, "single", (200,), (0.0, 1.0), samples=2)
    assert len(r["samples"]) == 4
    for s in r["samples"]:
        digits = "".join(c if c.isdigit() else " " for c in s["generated"]).split()
        assert s["correct"] == (bool(digits) and digits[0] == s["answer"])
        assert len(s["kv_fraction"]) == 4
    assert [row["depth"] for row in r["accuracy"]] == [0.0, 1.0, "all"]


def test_accuracy_table():
    rec = [{"length": 8, "depth": d, "correct": c} for d, c in [(0, 1), (0, 0), (1, 1), (1, 1)]]
    assert accuracy_table(rec) == [
        {"length": 8, "depth": 0, "accuracy": 0.5, "n": 2},
        {"length": 8, "depth": 1, "accuracy": 1.0, "n": 2},
        {"length": 8, "depth": "all", "accuracy": 0.75, "n": 4},
    ]


def test_mqar_through_caches_equals_full_forward(bundled):
    from ham_mlx.train.data import hash_seed
    from ham_mlx.train.mqar import MQAR

    model, _ = bundled
    r = mqar_accuracy(MLXRunner(model), vocab=64, pairs=4, seq_len=32, batches=2, batch_size=4,
                      chunk=10)  # fmt: skip
    hits = counted = 0
    for i in range(2):
        x, y, mask = MQAR(64, 4, 32).batch(hash_seed(0, 2, i), 4)
        pred = np.array(mx.argmax(model(mx.array(x)), axis=-1))
        hits, counted = hits + ((pred == y) & mask).sum(), counted + mask.sum()
    assert r["accuracy"] == pytest.approx(hits / counted)
    assert r["sequences"] == 8 and len(r["kv_fraction"]) == 4


def test_cli_end_to_end(tmp_path):
    def run(*args):
        cmd = [sys.executable, "-m", "ham_mlx.cli", "eval", *args, "--out", str(tmp_path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    p = run("ppl", "--max-tokens", "200", "--prefill-step-size", "64")
    assert p.returncode == 0, p.stderr
    assert "199 tokens" in p.stdout and "KV fraction" in p.stdout
    r = json.loads((tmp_path / "eval-ppl.json").read_text())
    assert r["tokens"] == 199 and r["perplexity"] > 1 and len(r["kv_fraction"]) == 4
    assert "perplexity" in (tmp_path / "eval-ppl.md").read_text()
    assert (tmp_path / "eval-ppl.png").stat().st_size > 1000
    p = run("niah", "--niah", "passkey", "--lengths", "128", "--depths", "0.5", "--samples", "1",
            "--no-progress")  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "eval-niah.json").read_text())
    assert r["niah"] == "passkey" and len(r["samples"]) == 1
    p = run("niah", "--depths", "1.5")
    assert p.returncode == 2 and "--depths" in p.stderr
    p = run("ppl", "--input", str(tmp_path / "missing.txt"))
    assert p.returncode == 2 and "missing.txt" in p.stderr
