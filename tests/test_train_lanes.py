"""Training lanes: a micro-batch split over worker threads gives the one-piece step's loss,
gradient and thresholds; the lanes really run on their threads; a process that trained with
lanes exits cleanly; the settings are checked."""

import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_train import config, weights

from ham_mlx.bench.train_step import TrainStep
from ham_mlx.train import Trainer
from ham_mlx.train.lanes import Lanes, default_lanes, split_rows, token_shares


def test_split_rows_and_shares():
    x, mask = np.arange(14).reshape(7, 2), np.array([[1, 0]] * 3 + [[1, 1]] * 4)
    parts = split_rows((x, None, mask), 2)
    assert [p[0].shape[0] for p in parts] == [4, 3] and parts[0][1] is None
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    assert token_shares([p[2] for p in parts]) == pytest.approx([5 / 11, 6 / 11])
    assert token_shares([np.zeros(3), np.zeros(2)]) == [0.5, 0.5]
    assert len(split_rows((x[:1],), 2)) == 1  # never an empty part


@pytest.mark.parametrize("batch,accum", [(8, 1), (14, 2)], ids=["even", "uneven-accum"])
def test_lanes_match_one_piece(tmp_path, batch, accum):
    """MQAR masks count a different number of tokens in each part, and with 14 rows in 2
    accumulation steps each micro-batch of 7 rows splits 4 + 3: the shares must weight them."""
    one = Trainer(config(tmp_path / "a", steps=6, lanes=1, batch_size=batch, grad_accum=accum))
    two = Trainer(config(tmp_path / "b", steps=6, lanes=2, batch_size=batch, grad_accum=accum))
    assert (one.lanes.n, two.lanes.n) == (1, 2)
    for _ in range(6):
        r1, r2 = one.train_step(), two.train_step()
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5, abs=1e-6)
        assert r2["kv_fraction"] == r1["kv_fraction"]
    a, b = weights(one.model), weights(two.model)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, rtol=1e-4, err_msg=k)
    np.testing.assert_allclose(one.model.thresholds(), two.model.thresholds(), atol=1e-5)


def test_lanes_run_on_their_own_threads(tmp_path):
    trainer = Trainer(config(tmp_path, steps=5, lanes=2))
    seen, micro = set(), trainer._micro

    def recording(*args):
        seen.add(threading.current_thread().name)
        return micro(*args)

    trainer._micro = recording
    trainer.train_step()
    assert len(seen) == 2 and all(n.startswith("ham-lane") for n in seen), seen


def test_uncompiled_steps_take_one_lane(tmp_path):
    assert Trainer(config(tmp_path, steps=5, lanes=2, compile=False)).lanes.n == 1


def test_a_process_that_trained_on_lanes_exits_cleanly(tmp_path):
    """Worker threads that ended while the interpreter shut down aborted the process (MLX's
    per-thread graphs hold Python functions); the lanes' daemon workers never end."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_train import config
from ham_mlx.train import Trainer
from pathlib import Path
trainer = Trainer(config(Path({str(tmp_path)!r}), steps=5, lanes=2))
trainer.train_step()
print("trained")
"""
    for _ in range(3):  # the abort was a race: most runs hit it
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]


def test_an_error_in_a_lane_reaches_the_caller():
    def failing(x):
        raise ValueError(f"bad part {x.shape}")

    with pytest.raises(ValueError, match="bad part"):
        Lanes(2).run(failing, [(mx.zeros((2,)),), (mx.zeros((3,)),)])
    outs = Lanes(2).run(lambda x: x * 2, [(mx.ones((2,)),)] * 2)
    assert [float(o.sum()) for o in outs] == [4.0, 4.0]


def test_settings_are_checked(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="lanes=0"):
        config(tmp_path, lanes=0)
    monkeypatch.setenv("HAM_MLX_TRAIN_LANES", "3")
    assert default_lanes() == 3
    monkeypatch.setenv("HAM_MLX_TRAIN_LANES", "two")
    with pytest.raises(ValueError, match="HAM_MLX_TRAIN_LANES"):
        default_lanes()
    with pytest.raises(ValueError, match="lanes=0"):
        Lanes(0)


def test_bench_variants_train_alike():
    """The throughput example's variants start from the same weights and batch: after one step
    each, the one-lane and two-lane fast paths hold the reference path's weights. AdamW's first
    step moves a weight by about ±lr (1e-3) whatever its gradient's size, so a wrong gradient
    shows as whole steps; rounding can flip the sign only where a gradient is ~0."""
    steps = [TrainStep(n, "tiny", 64, 4, 32) for n in ("reference", "fast one lane", "fast")]
    for s in steps:
        s.step()
    ref = weights(steps[0].model)
    for s in steps[1:]:
        got = weights(s.model)
        for k in ref:
            off = np.abs(got[k] - ref[k]) > 1e-4
            assert off.mean() < 1e-3, (s.name, k, int(off.sum()), off.size)
