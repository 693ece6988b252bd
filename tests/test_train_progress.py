"""Training-run messages: config mistakes that name their keys, the time-left estimate, the
saved model's path."""

import pytest

from ham_mlx.cli import main
from ham_mlx.train import TrainConfig, Trainer
from ham_mlx.train.progress import StepClock, duration

MQAR = {"kind": "mqar", "seq_len": 16, "mqar_vocab": 32, "mqar_pairs": 4}


def config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), model={"preset": "tiny"}, data=MQAR, steps=3,
                batch_size=4, warmup=1, eval_every=3, eval_batches=1,
                checkpoint_every=3)  # fmt: skip
    return {**base, **kw}


@pytest.mark.parametrize(
    "bad, message",
    [({"warmup": 3}, "warmup=3 must be < steps=3"), ({"warmup": 100}, "warmup=100"),
     ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr=0.01 must be <= lr=0.001")],
)  # fmt: skip
def test_config_mistakes_are_errors(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(config(tmp_path, **bad))


def test_steps_override_is_checked(tmp_path, capsys):
    path = tmp_path / "train.json"
    import json

    path.write_text(json.dumps(config(tmp_path, steps=10, warmup=5)))
    assert main(["train", "--config", str(path), "--steps", "4"]) == 2
    assert "warmup=5 must be < steps=4" in capsys.readouterr().err


def test_step_clock():
    clock = StepClock(window=3)
    assert clock.left(10) is None
    clock.add(20.0)  # the first step compiles
    assert clock.left(10) == 200.0
    for s in (1.0, 2.0, 3.0, 4.0):
        clock.add(s)
    assert clock.per_step() == 3.0 and clock.left(10) == 30.0  # median of the last 3
    assert [duration(s) for s in (42, 720, 12000)] == ["42 s", "12 min", "3 h 20 min"]


def test_fit_prints_the_estimate_and_the_saved_model(tmp_path, capsys):
    result = Trainer(TrainConfig.from_dict(config(tmp_path, steps=4, progress=True))).fit()
    err = capsys.readouterr().err
    assert "train: steps 1-4 of 4 x 16 tokens" in err
    assert "s/step" in err and "for the 2 steps left" in err
    final = tmp_path / "run" / "final"
    assert result["model"] == str(final) and f"saved the model to {final}" in err
    assert (final / "config.json").is_file()
