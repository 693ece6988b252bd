"""The MQAR generator: Zoology's layout, checked against the context it writes."""

import ham_mlx  # noqa: F401

# isort: split
import numpy as np
import pytest

from ham_mlx.train.config import DataConfig
from ham_mlx.train.data import Batches
from ham_mlx.train.mqar import MQAR, PAD


def context_pairs(row: np.ndarray) -> int:
    """The number of pairs a row opens with: the query region's odd offsets are padding."""
    return int(np.nonzero(row[1::2] == PAD)[0][0])


@pytest.mark.parametrize(
    "pairs,queries,seq_len,min_pairs",
    [(8, None, 40, None), (6, 3, 32, None), (16, None, 72, None), (16, None, 72, 4)],
)
def test_answers_are_the_values_paired_with_the_queried_keys(pairs, queries, seq_len, min_pairs):
    task = MQAR(128, pairs, seq_len, queries, min_pairs)
    x, y, mask = task.batch(seed=3, size=64)
    assert x.shape == y.shape == mask.shape == (64, seq_len)
    sizes = [context_pairs(r) for r in x]
    if min_pairs is None:
        assert set(sizes) == {pairs}
    else:  # a mixture of sizes, within the bounds
        assert min(sizes) >= min_pairs and max(sizes) <= pairs and len(set(sizes)) > 3
    for row, pairs in enumerate(sizes):
        q = pairs if queries is None else min(queries, pairs)
        context = x[row, : 2 * pairs]
        table = dict(zip(context[0::2].tolist(), context[1::2].tolist()))
        assert len(table) == pairs  # distinct keys
        assert all(k < 65 <= v for k, v in table.items())  # keys low half, values high half
        region = x[row, 2 * pairs :]
        asked = np.nonzero(region != PAD)[0]
        assert len(asked) == q and np.all(asked % 2 == 0)
        assert len(set(region[asked].tolist())) == q  # each key asked once
        assert not np.isin(region, list(table.values())).any()  # no value in the inputs
        answers = np.nonzero(mask[row])[0]
        assert np.array_equal(answers, asked + 2 * pairs)
        for pos in answers:
            assert y[row, pos] == table[int(x[row, pos])]


def test_batches_are_deterministic_per_seed():
    task = MQAR(128, 8, 40)
    a, b, c = task.batch(5, 4), task.batch(5, 4), task.batch(6, 4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "args,message",
    [
        ((20, 16, 72), "vocab 20 too small"),
        ((128, 16, 40), "seq_len 40 too short for 16 pairs and 16 queries"),
        ((128, 4, 40, 5), r"queries \(5\) must be in \[1, pairs=4\]"),
        ((128, 4, 40, None, 5), r"min_pairs \(5\) must be in \[1, pairs=4\]"),
    ],
)
def test_bad_settings_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        MQAR(*args)


def test_training_mixes_sizes_and_held_out_batches_do_not():
    cfg = DataConfig(kind="mqar", seq_len=72, mqar_vocab=128, mqar_pairs=16, mqar_min_pairs=4)
    batches = Batches(cfg, seed=0)
    train = {context_pairs(r) for r in batches.train_batch(0, 64)[0]}
    held_out = {context_pairs(r) for r in batches.eval_batch(0, 64)[0]}
    assert len(train) > 3 and min(train) >= 4
    assert held_out == {16}
