"""The checks of experiments/concave/concave_logistic.py, run by hand with `pytest experiments/concave` (the paper's
Fig. 3 on 8x8 digits): subgradient L1 leaves no exact zeros, the [0, 1] masks with l1/log regularisers sparsify at the
accuracy of plain logistic regression."""

from __future__ import annotations

import concave_logistic
import numpy as np
import pytest


@pytest.fixture(scope="module")
def script():
    return concave_logistic


@pytest.fixture(scope="module")
def result(script):
    return script.run(splits=5, lambdas=[1e-4, 0.1], seed=0, iterations=2000)


def test_subgradient_l1_finds_no_zeros_beyond_dead_pixels(script, result):
    # Pixels that are 0 in every training image keep a zero coefficient under any method; beyond
    # those, subgradient descent never lands exactly on 0, even at a large lambda.
    zeros = result["sparsity_l1"] * script.PIXELS
    assert np.all(zeros <= result["dead"][:, None])
    assert np.all(result["plain_sparsity"] * script.PIXELS == result["dead"])
    assert result["dead"].max() < 16


def test_masks_stay_in_unit_box_and_start_dense(result):
    for reg in ("l1", "log"):
        m = result[f"m_mask_{reg}"]
        assert m.shape == (5, 2, 64)
        assert m.min() >= 0.0 and m.max() <= 1.0
    # At the smallest lambda the mask keeps the plain model: same accuracy, no extra zeros.
    for name in ("mask_l1", "mask_log"):
        assert np.allclose(result[f"acc_{name}"][:, 0], result["plain_acc"])
        assert np.allclose(result[f"sparsity_{name}"][:, 0], result["plain_sparsity"])


def test_masks_sparsify_at_plain_accuracy(result):
    plain = result["plain_acc"].mean()
    assert plain > 0.95
    for name in ("mask_l1", "mask_log"):
        assert result[f"sparsity_{name}"][:, 1].mean() >= 0.8
        assert result[f"acc_{name}"][:, 1].mean() >= plain - 0.02
    assert result["sparsity_l1"][:, 1].mean() < 0.3


def test_log_regulariser_value_and_gradient(script):
    eps = script.EPS
    assert script.log_reg(np.array([0.0, 1.0])) == pytest.approx([0.0, 1.0])
    m = np.linspace(0.0, 1.0, 11)
    closed_form = 1.0 / ((m + eps) * np.log((1 + eps) / eps))
    h = 1e-6
    finite_difference = (script.log_reg(m + h) - script.log_reg(m - h)) / (2 * h)
    assert script.log_reg_grad(m) == pytest.approx(closed_form)
    assert finite_difference == pytest.approx(closed_form, rel=1e-6)
    # Concave and increasing on [0, 1], steepest at 0, above the l1 regulariser r(m) = m inside.
    assert np.all(np.diff(script.log_reg_grad(m)) < 0)
    assert np.all(script.log_reg(m[1:-1]) > m[1:-1])


def test_verdict_and_table(script, result):
    rows = script.summarise(result)
    assert [r["lambda"] for r in rows] == [1e-4, 0.1]
    assert rows[1]["mask_log_sparsity"] == pytest.approx(100 * result["sparsity_mask_log"][:, 1].mean())
    ok, lines = script.verdict(result, rows)
    assert ok, lines
    assert lines[-1].endswith("HOLDS here")
