"""The Reducer's sampling and score rule (`keras_relora.block_sampling`).

References are independent of the code under test: the hash against a
numpy uint32 implementation of lowbias32, the samplers against the exact
distribution of successive sampling without replacement (enumerated), the
score update against values worked out by hand.
"""

import itertools
import math

import numpy as np
from keras import ops

from keras_relora.reducer import block_sampling


def _lowbias32_reference(x):
    x = np.asarray(x).astype(np.uint32)
    x ^= x >> np.uint32(16)
    x = (x * np.uint32(0x7FEB352D)).astype(np.uint32)
    x ^= x >> np.uint32(15)
    x = (x * np.uint32(0x846CA68B)).astype(np.uint32)
    x ^= x >> np.uint32(16)
    return x


def _successive_probability(order, weights):
    """P(drawing `order`, in this order) one by one without replacement."""
    left = float(np.sum(weights))
    probability = 1.0
    for item in order:
        probability *= weights[item] / left
        left -= weights[item]
    return probability


def _subset_probabilities(weights, k):
    """Exact P(set of k items drawn), by enumerating every ordered draw."""
    probabilities = {}
    for order in itertools.permutations(range(len(weights)), k):
        key = tuple(sorted(order))
        probabilities[key] = probabilities.get(key, 0.0) + (
            _successive_probability(order, weights)
        )
    return probabilities


def _chi_square(counts, probabilities, draws):
    return sum(
        (counts.get(key, 0) - draws * p) ** 2 / (draws * p)
        for key, p in probabilities.items()
    )


# 99.9% quantile of the chi-square distribution with 9 degrees of freedom
# (C(5, 2) - 1 = 9 subsets): a correct sampler fails one run in 1000; the
# seed is fixed, so the test is deterministic.
_CHI2_9DF_999 = 27.877


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype="float64")))


def test_hash_matches_uint32_reference():
    words = np.array(
        [0, 1, 2, 7, 12345, -1, -(2**31), 2**31 - 1, 987654321, -5],
        dtype=np.int64,
    )
    got = ops.convert_to_numpy(
        block_sampling.lowbias32(ops.convert_to_tensor(words.astype("int32")))
    )
    np.testing.assert_array_equal(
        got.astype(np.uint32), _lowbias32_reference(words)
    )


def test_uniforms_are_in_open_interval_and_deterministic():
    u = ops.convert_to_numpy(
        block_sampling.block_uniforms(3, np.arange(4000), 5)
    )
    assert u.shape == (4000, 5)
    assert u.min() > 0 and u.max() < 1
    # Mean and variance of U(0, 1), 4 standard errors.
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / u.size)
    again = ops.convert_to_numpy(
        block_sampling.block_uniforms(3, np.arange(4000), 5)
    )
    np.testing.assert_array_equal(u, again)
    other = ops.convert_to_numpy(
        block_sampling.block_uniforms(4, np.arange(4000), 5)
    )
    assert not np.array_equal(u, other)


def test_update_mask_draws_k_blocks():
    scores = np.array([0.0, 1.0, -1.0, 2.0, 0.5], "float32")
    mask = ops.convert_to_numpy(
        block_sampling.update_mask(scores, 0, np.arange(200), 2)
    )
    assert mask.shape == (200, 5)
    np.testing.assert_array_equal(mask.sum(axis=1), 2)
    every = ops.convert_to_numpy(block_sampling.update_mask(scores, 0, 7, 9))
    assert every.all()


def test_update_mask_matches_successive_sampling():
    # Scores spread so that the probabilities differ clearly.
    scores = np.array([-1.5, -0.5, 0.0, 0.8, 2.0], "float32")
    draws, k = 20000, 2
    mask = ops.convert_to_numpy(
        block_sampling.update_mask(scores, 1234, np.arange(draws), k)
    )
    counts = {}
    for row in mask:
        key = tuple(np.flatnonzero(row))
        counts[key] = counts.get(key, 0) + 1
    # Update sampling is proportional to sigmoid(-scores).
    exact = _subset_probabilities(_sigmoid(-scores), k)
    assert _chi_square(counts, exact, draws) < _CHI2_9DF_999
    # Inclusion frequency per block, within 4 standard errors.
    inclusion = np.zeros(5)
    for key, p in exact.items():
        inclusion[list(key)] += p
    se = np.sqrt(inclusion * (1 - inclusion) / draws)
    assert np.all(np.abs(mask.mean(axis=0) - inclusion) < 4 * se)
    # The most important block (lowest score) is drawn most often.
    assert mask.mean(axis=0).argmax() == 0


def test_suppressed_blocks_match_successive_sampling():
    scores = np.array([-1.5, -0.5, 0.0, 0.8, 2.0])
    draws = 20000
    rng = np.random.default_rng(0)
    blocks = block_sampling.suppressed_blocks(scores, 2, draws, rng)
    assert blocks.shape == (draws, 2)
    counts = {}
    for row in blocks:
        key = tuple(sorted(row.tolist()))
        counts[key] = counts.get(key, 0) + 1
    # Suppression sampling is proportional to sigmoid(+scores).
    exact = _subset_probabilities(_sigmoid(scores), 2)
    assert _chi_square(counts, exact, draws) < _CHI2_9DF_999


def test_suppressed_blocks_skip_inactive():
    rng = np.random.default_rng(0)
    active = np.array([True, False, True, False])
    blocks = block_sampling.suppressed_blocks(np.zeros(4), 3, 50, rng, active)
    assert blocks.shape == (50, 2)  # Capped at the 2 active blocks.
    assert set(np.unique(blocks)) == {0, 2}


def test_update_mask_never_draws_pruned_blocks():
    active = np.array([True, False, True, True])
    scores = block_sampling.active_scores(np.zeros(4), active)
    mask = ops.convert_to_numpy(
        block_sampling.update_mask(scores, 5, np.arange(500), 2)
    )
    assert not mask[:, 1].any()
    np.testing.assert_array_equal(mask.sum(axis=1), 2)


def test_score_update_hand_computed():
    # 4 blocks, p = sigmoid(s) = [1/2, 3/4, 1/4, 1/2], so
    # p (1 - p) = [1/4, 3/16, 3/16, 1/4]. Losses [0, ln 2, ln 4] give
    # rewards [1, 1/2, 1/4], mean 7/12, centred [5/12, -1/12, -4/12].
    # Trials suppress {0, 1}, {1, 2}, {2, 3}; lr = 10:
    #   s0 = 0     + 10 * 1/4  * 5/12          = 25/24
    #   s1 = ln 3  + 10 * 3/16 * (5/12 - 1/12) = ln 3 + 5/8
    #   s2 = -ln 3 + 10 * 3/16 * (-1/12 - 4/12) = -ln 3 - 25/32
    #   s3 = 0     + 10 * 1/4  * -4/12         = -5/6
    ln3 = math.log(3.0)
    scores = np.array([0.0, ln3, -ln3, 0.0])
    suppressed = np.array([[0, 1], [1, 2], [2, 3]])
    losses = np.array([0.0, math.log(2.0), math.log(4.0)])
    new = block_sampling.update_scores(scores, suppressed, losses, lr=10.0)
    expected = [25 / 24, ln3 + 5 / 8, -ln3 - 25 / 32, -5 / 6]
    np.testing.assert_allclose(new, expected, rtol=1e-6)
    assert new.dtype == np.float32


def test_score_update_equal_losses_changes_nothing():
    scores = np.array([0.3, -0.2, 0.0, 1.0])
    new = block_sampling.update_scores(
        scores, np.array([[0, 1], [2, 3]]), np.array([1.0, 1.0]), lr=10.0
    )
    np.testing.assert_allclose(new, scores, rtol=1e-6)


def test_update_mask_batched_matches_single():
    # The compiled step draws one step at a time; the tests draw many.
    scores = np.array([0.1, -0.4, 0.9, 0.0], "float32")
    k = 2
    batched = ops.convert_to_numpy(
        block_sampling.update_mask(scores, 9, np.arange(3), k)
    )
    for step in range(3):
        single = ops.convert_to_numpy(
            block_sampling.update_mask(scores, 9, step, k)
        )
        np.testing.assert_array_equal(batched[step], single)
