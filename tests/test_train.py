"""The trainer: loss goes down, exact resume, gradient accumulation, threshold control from a
cold start, 2-process data parallelism, the tokenizer and data CLI."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ham_mlx.cli import main
from ham_mlx.train import TrainConfig, Trainer
from ham_mlx.train.data import TokenFile
from ham_mlx.train.thresholds import update_thresholds

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from train_distributed import CONFIG as DIST_CONFIG  # noqa: E402
from train_distributed import run as run_distributed_config  # noqa: E402

MQAR = {"kind": "mqar", "seq_len": 32, "mqar_vocab": 40, "mqar_pairs": 6}


def config(tmp_path, **kw):
    base = dict(
        out_dir=str(tmp_path / "run"), model={"preset": "tiny", "ham_threshold": 0.5},
        data=MQAR, steps=20, batch_size=8, lr=3e-3, warmup=4, kv_target=0.3, eval_every=10,
        eval_batches=2, checkpoint_every=10, progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig.from_dict(base)


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_training_reduces_loss_on_text(tmp_path):
    text = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "of", "and", "my", "lord", "love", "night", "day"]
    text.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    assert main(["tokenizer", "train", "--input", str(text), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok.model")]) == 0  # fmt: skip
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok.model"),
                 "--input", str(text), "--out", str(tmp_path / "data.bin")]) == 0  # fmt: skip
    train = TokenFile(tmp_path / "data.bin")
    assert train.tokens.size > 1000 and TokenFile(tmp_path / "data.valid.bin").tokens.size > 10
    cfg = config(
        tmp_path, data={"kind": "tokens", "train": str(tmp_path / "data.bin"),
                        "valid": str(tmp_path / "data.valid.bin"), "seq_len": 32},
        steps=40, tokenizer=str(tmp_path / "tok.model"), eval_every=40,
    )  # fmt: skip
    trainer = Trainer(cfg)
    first = trainer.evaluate()["eval_loss"]
    result = trainer.fit()
    assert result["eval"]["eval_loss"] < 0.7 * first, (first, result)
    assert (tmp_path / "run" / "final" / "tokenizer.model").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40


def test_resume_equals_uninterrupted(tmp_path):
    straight = Trainer(config(tmp_path / "a"))
    straight.fit()
    interrupted = Trainer(config(tmp_path / "b"))
    interrupted.fit(stop_at=10)  # a checkpoint at step 10, then the process "dies"
    resumed = Trainer(config(tmp_path / "b"))
    resumed.fit(resume=True)
    assert resumed.step == 20
    a, b = weights(straight.model), weights(resumed.model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-exact
    opt_a = dict(tree_flatten(straight.optimizer.state))
    opt_b = dict(tree_flatten(resumed.optimizer.state))
    for k in opt_a:
        np.testing.assert_array_equal(np.array(opt_a[k]), np.array(opt_b[k]), err_msg=k)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = Trainer(config(tmp_path / "a", steps=5, compile=False))
    two = Trainer(config(tmp_path / "b", steps=5, grad_accum=2, compile=False))
    for _ in range(5):
        one.train_step(), two.train_step()
    a, b = weights(one.model), weights(two.model)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, rtol=1e-4, err_msg=k)


def test_threshold_controller_reaches_target_from_cold_start():
    """A drifting stream of scores (an RNN that learns: scores fall over time, fast at first and
    slowly at the end, as under a cosine schedule), τ starting far away: the kept fraction on
    fresh scores ends within 0.02 of each layer's target."""

    class Layer:
        threshold = mx.array(0.0)

    layers, targets = [Layer(), Layer()], [0.1, 0.4]
    rng = np.random.default_rng(0)
    for step in range(300):
        centre = 0.5 + 0.25 * (1 + np.cos(np.pi * step / 300))  # 1.0 -> 0.5
        scores = [mx.array(rng.normal(centre, 0.2, (8, 64)).astype(np.float32)) for _ in layers]
        update_thresholds(layers, scores, targets, rate=0.1)
    held_out = rng.normal(0.5, 0.2, 100_000)
    for layer, target in zip(layers, targets):
        kept = np.mean(held_out >= float(layer.threshold))
        assert abs(kept - target) <= 0.02, (target, kept)


def test_trained_thresholds_hold_the_target_on_held_out_data(tmp_path):
    trainer = Trainer(config(tmp_path, steps=60, eval_batches=8, kv_target=[0.2, 0.35]))
    trainer.fit()
    evaluation = trainer.evaluate()
    for got, want in zip(evaluation["eval_kv_fraction"], [0.2, 0.35]):
        assert abs(got - want) <= 0.03, evaluation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not on PATH")
def test_two_process_data_parallel_matches_single_process(tmp_path):
    cmd = ["mlx.launch", "-n", "2", "--backend", "ring", "-p", str(free_port()),
           sys.executable, str(SCRIPTS / "train_distributed.py"), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rank0 = mx.load(str(tmp_path / "rank0.safetensors"))
    rank1 = mx.load(str(tmp_path / "rank1.safetensors"))
    for k in rank0:
        np.testing.assert_array_equal(np.array(rank0[k]), np.array(rank1[k]), err_msg=k)
    single = tmp_path / "single"
    single.mkdir()
    run_distributed_config(str(single))  # the same global batch in one process
    ref = mx.load(str(single / "rank0.safetensors"))
    for k in ref:
        # fp32 noise: the same sums in another order, then 6 Adam steps (which divide by sqrt(v))
        np.testing.assert_allclose(np.array(rank0[k]), np.array(ref[k]), atol=5e-5, err_msg=k)
    assert DIST_CONFIG["batch_size"] == 8
