"""The threshold controller from a cold start on real text: every HAM layer's admitted fraction
is near its target after 50 steps (spec §6), and the rate schedule that gets it there."""

import pytest

from ham_mlx.eval.haystack import HAYSTACK_FILE
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path
from ham_mlx.train import TrainConfig, Trainer
from ham_mlx.train.data import write_token_file
from ham_mlx.train.thresholds import controller_rate

TARGETS = [0.1, 0.25]


def test_controller_rate_schedule():
    assert controller_rate(0, 0.1, 0) == 1.0  # τ starts at the first batch's quantile
    assert controller_rate(1, 0.1, 0) == 0.1
    assert controller_rate(49, 0.1, 50) == 1.0  # through the warmup: the previous batch's
    assert controller_rate(50, 0.1, 50) == 0.1 == controller_rate(500, 0.1, 50)


@pytest.mark.slow
def test_fraction_reaches_target_within_50_steps_on_text(tmp_path):
    tok = Tokenizer.from_file(bundled_tokenizer_path())
    text = HAYSTACK_FILE.read_text(encoding="utf-8")
    train = write_token_file(tok, [text], tmp_path / "train")
    cfg = TrainConfig.from_dict(dict(
        out_dir=str(tmp_path / "run"), model={"preset": "tiny", "ham_threshold": 0.5},
        tokenizer=str(bundled_tokenizer_path()), kv_target=TARGETS, steps=1000, warmup=50,
        data={"kind": "tokens", "train": str(train), "seq_len": 64},
        batch_size=16, progress=False,
    ))  # fmt: skip
    trainer = Trainer(cfg)
    first = trainer.train_step()["kv_fraction"]  # routed with the initial τ = 0.5
    assert max(abs(f - t) for f, t in zip(first, TARGETS)) > 0.2  # a cold start
    late = [trainer.train_step()["kv_fraction"] for _ in range(49)][-10:]
    # Each batch is new data routed with the τ of earlier steps: steps 41-50, per layer.
    for i, want in enumerate(TARGETS):
        got = sum(f[i] for f in late) / len(late)
        assert abs(got - want) <= 0.025, (i, got, late)
        print(f"layer {i}: mean fraction of steps 41-50 {got:.4f} (target {want})")
