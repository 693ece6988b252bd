"""The MQAR generator: Zoology's layout, checked against the context it writes."""

import ham_mlx  # noqa: F401

# isort: split
import numpy as np
import pytest

from ham_mlx.train.mqar import MQAR, PAD


def context_pairs(row: np.ndarray) -> int:
    """The number of pairs a row opens with: the query region's odd offsets are padding."""
    return int(np.nonzero(row[1::2] == PAD)[0][0])


@pytest.mark.parametrize("pairs,queries,seq_len", [(8, None, 40), (6, 3, 32), (16, None, 72)])
def test_answers_are_the_values_paired_with_the_queried_keys(pairs, queries, seq_len):
    task = MQAR(128, pairs, seq_len, queries)
    x, y, mask = task.batch(seed=3, size=64)
    assert x.shape == y.shape == mask.shape == (64, seq_len)
    q = pairs if queries is None else queries
    for row in range(64):
        assert context_pairs(x[row]) == pairs
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
    ],
)
def test_bad_settings_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        MQAR(*args)
