"""The checks of experiments/greedy/greedy_rate.py, run by hand with `pytest experiments/greedy` (Ye, Wu and Liu, Fig.
1): the MLP's Gram matrix in the framework's convention, folding the pruned layer into the next one, both greedy
imitations on a tiny network, the rate fits and a tiny end-to-end run. The closed-form local step itself is tested in
tests/test_greedy.py."""

from __future__ import annotations

import greedy_rate
import numpy as np
import pytest
import torch

from prunelab.methods.greedy_steps import gram_of, local_discrepancy

WIDTH = 5


@pytest.fixture(scope="module")
def script():
    return greedy_rate


@pytest.fixture(scope="module")
def tiny(script):
    """A trained 5-5 network on 40 points: (net, x, u)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y, _ = script.make_data(40, gen)
    net = script.train(script.init_net(WIDTH, WIDTH, gen), x, y, steps=200, lr=3e-2)
    return net, x, torch.full((WIDTH,), 1.0 / WIDTH, dtype=script.DTYPE)


def explicit_local_loss(script, net, x, a, u) -> float:
    """D_bar computed from the layer outputs themselves, without the Gram matrix."""
    return float(((script.layer_output(net, x, a) - script.layer_output(net, x, u)) ** 2).sum(dim=1).mean())


def test_gram_is_the_frameworks_for_the_second_layer_and_gives_the_layer_discrepancy(script, tiny):
    net, x, u = tiny
    gram = script.local_gram(net, x)
    consumer = torch.nn.Linear(WIDTH, WIDTH, bias=False, dtype=script.DTYPE)
    with torch.no_grad():
        consumer.weight.copy_(net.w2)
    assert torch.allclose(gram, gram_of(consumer, script.hidden1(net, x)), rtol=1e-10, atol=1e-12)
    # u = N A: the framework's discrepancy of sum_i u_i c_i to sum_i c_i is the paper's D_bar[f_A, F_1].
    a = torch.tensor([0.6, 0.0, 0.1, 0.3, 0.0], dtype=script.DTYPE)
    assert local_discrepancy(gram, WIDTH * a) == pytest.approx(explicit_local_loss(script, net, x, a, u), rel=1e-10)
    assert local_discrepancy(gram, WIDTH * u) == pytest.approx(0.0, abs=1e-12)


def test_folding_equals_explicit_weighted_sum(script, tiny):
    net, x, u = tiny
    for a in (torch.tensor([0.6, 0.0, 0.1, 0.3, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]), u):
        a = a.to(script.DTYPE)
        small = script.fold(net, a)
        assert small.w1.shape[0] == int((a > 0).sum())
        explicit = script.head(net, script.layer_output(net, x, a))
        assert torch.allclose(script.forward(small, x), explicit, rtol=1e-12, atol=1e-12)
    # The dense layer is the uniform combination: folding it gives back the trained network.
    assert torch.allclose(script.forward(script.fold(net, u), x), script.forward(net, x), rtol=1e-12, atol=1e-12)


def test_local_imitation_decreases_to_zero_at_full_width(script, tiny):
    net, x, _u = tiny
    gram = script.local_gram(net, x)
    iterates, losses = script.local_imitation(gram, max_steps=500)
    assert torch.all(iterates >= 0)
    assert torch.allclose(iterates.sum(dim=1), torch.ones(len(iterates), dtype=script.DTYPE))
    assert torch.all(losses[1:] <= losses[:-1])
    best = script.best_per_size(iterates, losses, WIDTH)
    by_size = losses[best]
    assert torch.all(by_size[1:] <= by_size[:-1])
    assert by_size[-1] <= 1e-10 * by_size[0]
    # The best single neuron is the start (eq. 3).
    singles = [local_discrepancy(gram, WIDTH * torch.eye(WIDTH, dtype=script.DTYPE)[i]) for i in range(WIDTH)]
    assert float(losses[0]) == pytest.approx(min(singles))
    curve = script.pruning_curve(net, x, iterates, losses)
    assert curve[-1] <= 1e-10 * curve[0]


def test_global_imitation_decreases_to_near_zero_at_full_width(script, tiny):
    net, x, _ = tiny
    iterates, losses = script.global_imitation(net, x, picks=400)
    # gamma_k = 1 / (1 + k): after k picks A is the average of the picked neurons.
    assert sorted(iterates[0].tolist()) == [0.0] * (WIDTH - 1) + [1.0]
    assert torch.allclose(iterates[9] * 10, (iterates[9] * 10).round())
    target = script.forward(net, x)
    for k in (0, 7, 150):
        assert float(losses[k]) == pytest.approx(script.discrepancy(script.fold(net, iterates[k]), target, x))
    curve = script.pruning_curve(net, x, iterates, losses)
    assert np.all(np.diff(curve) <= 0)
    # The averaged (Frank-Wolfe) weights reach the dense network only slowly: near 0, not 0.
    assert curve[-1] <= 1e-3 * curve[0]


def test_rate_fits_recover_known_curves(script):
    n = np.arange(1, 30)
    _, b, r2 = script.fit_exponential(n, 3.0 * np.exp(-0.25 * n))
    assert b == pytest.approx(0.25) and r2 == pytest.approx(1.0)
    _, d, r2 = script.fit_power(n, 2.0 / n)
    assert d == pytest.approx(1.0) and r2 == pytest.approx(1.0)


def test_run_tiny_end_to_end(script):
    res = script.run(seed=1, width=6, samples=48, steps=100, scratch_widths=(1, 2, 6), local_steps=300, global_picks=30)
    assert res["local"].shape == res["global"].shape == (6,)
    assert res["scratch"].shape == (3,) and np.all(res["scratch"] > 0)
    assert res["local"][-1] <= 1e-8 * res["local"][0]
    fit = script.rates(res)
    _ok, lines = script.verdict(res, fit, check_n=(2,))
    assert lines[-1].startswith("VERDICT") and len(lines) == 6
    assert [r["n"] for r in script.table(res)] == [1, 2, 6]


def test_held_out_points_and_noise_leave_the_training_data_and_measure_d_elsewhere(script):
    """--heldout M draws M fresh inputs and --noise s perturbs the targets, both without changing the training inputs
    or any network's initial weights; D is then measured on the fresh points, where pruning to full width still
    gives the dense network."""
    x, y, x_eval = script.make_data(40, torch.Generator().manual_seed(3))
    assert x_eval is x
    x2, y2, fresh = script.make_data(40, torch.Generator().manual_seed(3), heldout=25)
    assert torch.equal(x2, x) and torch.equal(y2, y) and fresh.shape == (25, x.shape[1])
    assert torch.cdist(fresh, x).min() > 0
    _, noisy, _ = script.make_data(400, torch.Generator().manual_seed(3), heldout=25, noise=0.1)
    clean = script.make_data(400, torch.Generator().manual_seed(3), heldout=25)[1]
    assert float((noisy - clean).std()) == pytest.approx(0.1, rel=0.15)

    kwargs = dict(seed=1, width=6, samples=48, steps=100, scratch_widths=(1, 6), local_steps=300, global_picks=30)
    on_train, held_out = script.run(**kwargs), script.run(**kwargs, heldout=30)
    assert held_out["local"][-1] <= 1e-8 * held_out["local"][0]
    assert not np.allclose(held_out["local"][:-1], on_train["local"][:-1])
    assert held_out["dense_mse"] == on_train["dense_mse"]  # the same dense network
    noisy_run = script.run(**kwargs, noise=0.1)
    assert noisy_run["dense_mse"] != on_train["dense_mse"]


def test_mean_field_variant_starts_the_middle_layer_at_zero_and_learns(script):
    """--trainer mf-gd --middle-init zero: V starts at exactly 0 and mean-field gradient descent fits the data."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y, _ = script.make_data(40, gen)
    net = script.init_net(WIDTH, WIDTH, gen, middle="zero")
    assert torch.count_nonzero(net.w2) == 0
    before = float(((script.forward(net, x) - y) ** 2).mean())
    trained = script.train(net, x, y, steps=200, lr=0.05, trainer="mf-gd")
    assert torch.count_nonzero(trained.w2) == WIDTH * WIDTH
    assert float(((script.forward(trained, x) - y) ** 2).mean()) < 0.5 * before
