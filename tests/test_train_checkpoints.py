"""Checkpoints that survive kills: each is written whole into a hidden folder, then renamed;
`--resume` takes the newest complete one and says which broken ones it skips. Config values are
checked, naming the key and value."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ham_mlx.cli import main
from ham_mlx.train import TrainConfig, Trainer
from ham_mlx.train.checkpoints import PAUSE_ENV

MQAR = {"kind": "mqar", "seq_len": 16, "mqar_vocab": 40, "mqar_pairs": 4}
BASE = dict(model={"preset": "tiny"}, data=MQAR, steps=6, batch_size=4, warmup=1,
            eval_every=100, eval_batches=1, checkpoint_every=2, keep_checkpoints=5,
            progress=False, compile=False)  # fmt: skip


def write_config(tmp_path, **kw) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(BASE | {"out_dir": str(tmp_path / "run")} | kw))
    return path


def steps_saved(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("lr", float("nan"), "lr=nan"),
        ("lr", "fast", "lr='fast'"),
        ("checkpoint_every", 0, "checkpoint_every=0"),
        ("keep_checkpoints", 0, "keep_checkpoints=0"),
        ("steps", "ten", "steps='ten'"),
        ("steps", 2.5, "steps=2.5"),
        ("compile", "yes", "compile='yes'"),
        ("betas", [0.9], "betas=[0.9]"),
        ("data", {"kind": "mqar", "seq_len": "x"}, "data.seq_len='x'"),
        ("data", [1], "data=[1]"),
        ("model", "tiny", "model='tiny'"),
    ],
    ids=lambda v: str(v),
)
def test_config_errors_name_the_key_and_value(tmp_path, capsys, key, value, words):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(BASE | {key: value}))  # NaN: JSON as Python writes it
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_resume_skips_broken_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path, steps=6))]) == 0
    assert steps_saved(run) == ["step-0000002", "step-0000004", "step-0000006"]
    newest = run / "checkpoints" / "step-0000006"
    opt = newest / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # a truncated optimizer file
    (run / "checkpoints" / "step-0000004" / "trainer.json").unlink()  # an unfinished one
    capsys.readouterr()
    trainer = Trainer(TrainConfig.from_file(write_config(tmp_path, steps=8)))
    trainer.fit(resume=True, stop_at=3)
    err = capsys.readouterr().err
    assert "step-0000006" in err and "step-0000004" in err and "skipping" in err, err
    assert trainer.step == 3  # resumed from step 2, the newest complete one


def test_keep_checkpoints_and_no_leftovers(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path, keep_checkpoints=2))]) == 0
    assert steps_saved(run) == ["step-0000004", "step-0000006"]


def kill_while_saving(tmp_path, wait_for: str) -> Path:
    """Train in a subprocess and SIGKILL it once the checkpoint of step 4 is being written and
    `wait_for` exists in its hidden folder ("" : as soon as the folder exists)."""
    cfg = write_config(tmp_path)
    env = os.environ | {PAUSE_ENV: "1.0"}
    proc = subprocess.Popen([sys.executable, "-m", "ham_mlx.cli", "train", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    root = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            partial = [p for p in root.glob(".step-0000004.partial-*") if p.is_dir()]
            if partial and (not wait_for or (partial[0] / wait_for).exists()):
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return tmp_path / "run"


@pytest.mark.parametrize("wait_for", [
    pytest.param("", marks=pytest.mark.slow),  # the folder exists: the model is being written
    pytest.param("config.json", marks=pytest.mark.slow),  # the model folder is written
    "optimizer.safetensors",  # only trainer.json is missing
])  # fmt: skip
def test_resume_after_a_kill_during_a_checkpoint(tmp_path, capsys, wait_for):
    run = kill_while_saving(tmp_path, wait_for)
    assert steps_saved(run)[-1] == "step-0000002"  # no step-4 folder: it was never complete
    assert main(["train", "--config", str(write_config(tmp_path)), "--resume"]) == 0
    assert steps_saved(run) == ["step-0000002", "step-0000004", "step-0000006"]  # hidden ones gone
    assert json.loads((run / "checkpoints/step-0000006/trainer.json").read_text())["step"] == 6


def test_a_loss_that_is_not_finite_stops_training(tmp_path, capsys):
    assert main(["train", "--config", str(write_config(tmp_path, lr=1e30))]) == 2
    assert "the loss is nan" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))  # no NaN model is saved
    assert not (tmp_path / "run" / "final").exists()
