"""Pruning vs training from scratch: the rate check of Ye, Wu and Liu (Section 2.3, Figure 1).

Reproduces the paper's numerical check that greedily pruning a layer gives a discrepancy to the dense
network that falls exponentially in the number n of neurons kept, while a network of the same size
trained from scratch only gets ~1/n. A network with two tanh hidden layers of `--width` (100) neurons
is trained on simulated data; its first hidden layer is pruned to n = 1..width neurons by local and by
global imitation, and networks whose first hidden layer has n neurons are trained from scratch.

Setup (the paper's appendix with its data and activation is lost; this is our choice): inputs
x ~ N(0, I_4), noiseless targets y = sum_{j<16} c_j sin(w_j . x + phi_j) with w_j ~ N(0, I_4),
c_j ~ N(0, 1/16), phi_j ~ U[0, 2 pi), `--samples` (500) points. The networks are
x -> w3 tanh(w2 tanh(w1 x + b1) + b2) + b3 in the paper's mean-field form (each layer the average of
its neurons, Sec. 2): the trained parameters are w1, b1, V = N1 w2, v3 = N2 w3, b2, b3, initialised
i.i.d. N(0, 1) (b2, b3 at 0). Every network (dense and from scratch, same recipe, float64) is trained by
full-batch Adam on the mean squared error, learning rate `--lr` with cosine decay over `--steps`
steps. The discrepancy of any network f to the dense network F is the paper's
D[f, F] = mean over the training points of (f(x) - F(x))^2 (`--heldout M`: over M fresh points instead;
`--noise s` adds N(0, s^2) to the training targets).

Pruning, as in Sections 2.1-2.2. The paper writes the dense layer as F_1 = (1/N) sum_i sigma_i: neuron
i is the vector it sends to the next layer, sigma_i(x) = V[:, i] h_i(x) with h_i = tanh(w1_i . x + b1_i)
and V = N * w2 its outgoing weights, so the dense network is a_i = 1/N. A pruned layer is
sum_i a_i sigma_i with A on the probability simplex; folding A into the next layer
(V[:, i] *= a_i, neurons with a_i = 0 dropped) gives an ordinary network with n = ||A||_0 neurons.

- local imitation (eqs. 3-4): start from the single neuron closest to F_1; each step picks the neuron i
  and step gamma in U_i ([0, 1] if a_i = 0, [-a_i / (1 - a_i), 1] if a_i > 0) minimising the layer
  discrepancy of (1 - gamma) f + gamma sigma_i; gamma at the lower bound removes neuron i. The step
  (closed form from the Gram matrix), the update and the layer discrepancy are the framework's
  (`local_step`, `move`, `local_discrepancy` in prunelab.methods.greedy, whose docstring derives them),
  in its convention: the contributions c_i = w2[:, i] h_i = sigma_i / N, u = N A, the dense layer u = 1.
  Steps stop when nothing decreases the loss, the loss is below 1e-14 ||F_1||^2, or after 20 N steps.
- global imitation (eqs. 6-8): each step picks the neuron i minimising the network's final
  discrepancy D after A <- (1 - gamma_k) A + gamma_k e_i (`move`) with gamma_k = 1 / (1 + k). Reading: (6) is
  (8) at k = 0 (gamma_0 = 1 replaces the layer by one neuron), so after k picks A is the uniform
  average of the picked neurons, repeats included. 5 N picks; no Taylor approximation (Sec. 2.2.1).

The algorithms' iterates do not have one size each (a step may add, re-weight or remove a neuron), so
the network "pruned to n neurons" is the iterate with at most n neurons that is best for the
algorithm's own objective (the layer discrepancy for local, D for global); its D is reported.

Deviations: the networks trained from scratch fit the data (not the dense network's outputs) and are
compared to the dense network by D, for n in `--scratch-widths` only (1, 2, 4, ..., 64, 100). The
exponential fits log D = a - b n use n = 1..N-1: at n = N pruning can return the dense network
itself, where D is 0 up to rounding.

    python experiments/greedy/greedy_rate.py [--seed 0] [--out outputs/greedy_rate] [--width 100] [--samples 500]
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunelab.methods.greedy_steps import local_discrepancy, local_step, move

DTYPE = torch.float64
SCRATCH_WIDTHS = (1, 2, 4, 8, 16, 32, 64, 100)
INPUT_DIM = 4
RIDGES = 16


@dataclass
class Net:
    """A network x -> w3 tanh(w2 tanh(w1 x + b1) + b2) + b3 with a scalar output, stored in this ordinary
    form (the mean-field weights are V = N1 w2 and v3 = N2 w3)."""

    w1: torch.Tensor  # (N1, d)
    b1: torch.Tensor  # (N1,)
    w2: torch.Tensor  # (N2, N1)
    b2: torch.Tensor  # (N2,)
    w3: torch.Tensor  # (N2,)
    b3: torch.Tensor  # ()

    def params(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2, self.w3, self.b3]


def make_data(
    samples: int, gen: torch.Generator, heldout: int = 0, noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs x ~ N(0, I_d) and targets y = sum_j c_j sin(w_j . x + phi_j) + noise * N(0, 1); also the points
    on which D is measured: `heldout` fresh inputs from the same distribution, or x itself when 0."""
    x = torch.randn(samples, INPUT_DIM, generator=gen, dtype=DTYPE)
    w = torch.randn(RIDGES, INPUT_DIM, generator=gen, dtype=DTYPE)
    c = torch.randn(RIDGES, generator=gen, dtype=DTYPE) / math.sqrt(RIDGES)
    phi = 2 * math.pi * torch.rand(RIDGES, generator=gen, dtype=DTYPE)
    y = torch.sin(x @ w.T + phi) @ c

    # Drawn from their own generators, so that every network starts from the same weights with and without them.
    def side(k: int) -> torch.Generator:
        return torch.Generator().manual_seed(gen.initial_seed() + k)

    x_eval = torch.randn(heldout, INPUT_DIM, generator=side(1), dtype=DTYPE) if heldout else x
    if noise:
        y = y + noise * torch.randn(samples, generator=side(2), dtype=DTYPE)
    return x, y, x_eval


def init_net(width1: int, width2: int, gen: torch.Generator, middle: str = "normal") -> Net:
    """Mean-field initialisation: every neuron's weights i.i.d. N(0, 1) (w1, b1, V = width1 * w2 and
    v3 = width2 * w3), the biases b2 and b3 zero; `middle` "zero" starts V at 0 (in the multi-layer
    mean-field limit i.i.d. middle weights average out, so V is learned from 0)."""

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=DTYPE)

    return Net(
        w1=normal(width1, INPUT_DIM),
        b1=normal(width1),
        w2=normal(width2, width1) / width1 * (middle != "zero"),
        b2=torch.zeros(width2, dtype=DTYPE),
        w3=normal(width2) / width2,
        b3=torch.zeros((), dtype=DTYPE),
    )


def hidden1(net: Net, x: torch.Tensor) -> torch.Tensor:
    """First hidden layer activations h (m, N1)."""
    return torch.tanh(x @ net.w1.T + net.b1)


def head(net: Net, s: torch.Tensor) -> torch.Tensor:
    """The layers after the first hidden one (H_2 in the paper), fed the first layer's output s as the
    second layer sees it, s = w2 h: (..., N2) -> (...)."""
    return torch.tanh(s + net.b2) @ net.w3 + net.b3


def forward(net: Net, x: torch.Tensor) -> torch.Tensor:
    return head(net, hidden1(net, x) @ net.w2.T)


def train(net: Net, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, trainer: str = "adam") -> Net:
    """`trainer` "mf-gd": plain full-batch gradient descent in mean-field time (each parameter's step scaled
    by the widths it is averaged over: w1, b1 by N1, V by N1 N2, v3, b2 by N2), so that networks of every
    width follow the same mean-field dynamics. "adam": full-batch Adam on the mean squared error, learning rate lr *
    cosine decay to 0, in the mean-field parametrisation: the trained parameters are V = N1 * w2 and v3 = N2 * w3
    (with w1, b1, b2, b3)."""
    n1, n2 = net.w2.shape[1], net.w2.shape[0]
    mf = [net.w1, net.b1, net.w2 * n1, net.b2, net.w3 * n2, net.b3]
    params = [p.clone().requires_grad_(True) for p in mf]
    w1, b1, v, b2, v3, b3 = params

    def model() -> Net:
        return Net(w1, b1, v / n1, b2, v3 / n2, b3)

    if trainer == "mf-gd":
        for _ in range(steps):
            grads = torch.autograd.grad(((forward(model(), x) - y) ** 2).mean(), params)
            with torch.no_grad():
                for p, g, s in zip(params, grads, (n1, n1, n1 * n2, n2, n2, 1.0)):
                    p -= lr * s * g
        with torch.no_grad():
            return Net(*[p.detach() for p in model().params()])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((forward(model(), x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return Net(*[p.detach() for p in model().params()])


def outgoing(net: Net) -> torch.Tensor:
    """V = N1 * w2, the neurons' outgoing weights when the dense layer is (1/N1) sum_i sigma_i."""
    return net.w2 * net.w2.shape[1]


def layer_output(net: Net, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The pruned layer sum_i a_i sigma_i(x), computed explicitly neuron by neuron: (m, N2)."""
    h, v = hidden1(net, x), outgoing(net)
    return sum(a[i] * h[:, i, None] * v[:, i] for i in range(len(a)))


def fold(net: Net, a: torch.Tensor) -> Net:
    """The pruned network as an ordinary smaller network: only the neurons with a_i > 0 are kept and
    a_i is folded into their outgoing weights, V[:, i] *= a_i."""
    keep = torch.nonzero(a > 0).flatten()
    return Net(w1=net.w1[keep], b1=net.b1[keep], w2=outgoing(net)[:, keep] * a[keep], b2=net.b2, w3=net.w3, b3=net.b3)


def discrepancy(f: Net, target: torch.Tensor, x: torch.Tensor) -> float:
    """D[f, F] = mean over x of (f(x) - F(x))^2, with target = F(x)."""
    return float(((forward(f, x) - target) ** 2).mean())


def local_gram(net: Net, x: torch.Tensor) -> torch.Tensor:
    """G_jk = mean over x of <c_j(x), c_k(x)> for the neurons' contributions c_i = w2[:, i] h_i to the second
    layer, as `prunelab.methods.greedy` defines them (the reading layer's weight times the neuron's
    output). c_i = sigma_i / N1, so that F_1 = sum_i c_i is u = 1 and f_A = sum_i u_i c_i with u = N1 A.
    For a fully connected reading layer G factorises: G = (h^T h / m) * (w2^T w2) (elementwise)."""
    h = hidden1(net, x)
    return (h.T @ h / len(x)) * (net.w2.T @ net.w2)


def local_imitation(gram: torch.Tensor, max_steps: int, tol: float = 1e-14) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy local imitation (eqs. 3-4) with the framework's closed-form step (`local_step`, `move`):
    from the best single neuron, take the best (neuron, gamma) step until no step decreases D_bar,
    D_bar <= tol * ||F_1||^2, or `max_steps` steps. Returns the iterates A (K, N) and their layer
    discrepancies D_bar[f_A, F_1] (K,)."""
    n = gram.shape[0]
    singles = torch.tensor([local_discrepancy(gram, n * e) for e in torch.eye(n, dtype=gram.dtype)])  # eq. 3
    a = torch.zeros(n, dtype=gram.dtype)
    a[int(torch.argmin(singles))] = 1.0
    stop = tol * float(gram.sum())  # ||F_1||^2 = 1^T G 1
    iterates, losses = [a], [local_discrepancy(gram, n * a)]
    for _ in range(max_steps):
        if losses[-1] <= stop:
            break
        i, gamma, decrease = local_step(gram, n * a, a > 0)
        if not decrease > 0:
            break
        a = move(a, i, gamma)
        iterates.append(a)
        losses.append(local_discrepancy(gram, n * a))
    return torch.stack(iterates), torch.tensor(losses, dtype=DTYPE)


def global_candidates(
    net: Net, h: torch.Tensor, a: torch.Tensor, gamma: float, target: torch.Tensor, chunk: int = 25
) -> torch.Tensor:
    """D[H_2((1 - gamma) f_A + gamma sigma_i), F] for every neuron i (the objective of eq. 8): (N,)."""
    v = outgoing(net)
    base = (1 - gamma) * (h * a) @ v.T  # (m, N2)
    out = []
    for start in range(0, len(a), chunk):
        idx = torch.arange(start, min(start + chunk, len(a)))
        s = base + gamma * h.T[idx, :, None] * v.T[idx, None, :]  # (c, m, N2)
        out.append(((head(net, s) - target) ** 2).mean(dim=1))
    return torch.cat(out)


def global_imitation(net: Net, x: torch.Tensor, picks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy global imitation (eqs. 6-8) for `picks` steps k = 0, 1, ...: pick the neuron minimising the
    final discrepancy D after A <- (1 - gamma_k) A + gamma_k e_i, gamma_k = 1 / (1 + k) (k = 0 is eq. 6).
    Returns the iterates A (K, N) and their discrepancies D (K,)."""
    h, target = hidden1(net, x), forward(net, x)
    n = net.w1.shape[0]
    a = torch.zeros(n, dtype=DTYPE)
    iterates, losses = [], []
    for k in range(picks):
        gamma = 1.0 / (1 + k)
        loss = global_candidates(net, h, a, gamma, target)
        i = int(torch.argmin(loss))
        a = move(a, i, gamma)
        iterates.append(a)
        losses.append(float(loss[i]))
    return torch.stack(iterates), torch.tensor(losses, dtype=DTYPE)


def best_per_size(iterates: torch.Tensor, losses: torch.Tensor, width: int) -> list[int]:
    """For n = 1..width, the index of the iterate with at most n neurons and the lowest loss."""
    sizes = (iterates > 0).sum(dim=1)
    best = []
    for n in range(1, width + 1):
        masked = torch.where(sizes <= n, losses, torch.full_like(losses, math.inf))
        best.append(int(torch.argmin(masked)))
    return best


def max_size(iterates: torch.Tensor) -> int:
    """The most neurons any iterate uses."""
    return int((iterates > 0).sum(dim=1).max())


def step_kinds(iterates: torch.Tensor) -> tuple[int, int, int]:
    """How many steps added neurons, removed neurons, or only re-weighted: (adds, removals, re-weights)."""
    change = torch.diff((iterates > 0).sum(dim=1))
    return int((change > 0).sum()), int((change < 0).sum()), int((change == 0).sum())


def pruning_curve(net: Net, x: torch.Tensor, iterates: torch.Tensor, losses: torch.Tensor) -> np.ndarray:
    """D of the network pruned to n = 1..N neurons (the best iterate of each size, folded), measured on x."""
    target = forward(net, x)
    best = best_per_size(iterates, losses, net.w1.shape[0])
    cache = {k: discrepancy(fold(net, iterates[k]), target, x) for k in set(best)}
    return np.array([cache[k] for k in best])


def run(
    seed: int = 0,
    width: int = 100,
    samples: int = 500,
    steps: int = 2000,
    lr: float = 3e-2,
    scratch_widths: Sequence[int] = SCRATCH_WIDTHS,
    local_steps: int | None = None,
    global_picks: int | None = None,
    trainer: str = "adam",
    middle: str = "normal",
    heldout: int = 0,
    noise: float = 0.0,
) -> dict:
    """Trains the dense network, prunes its first hidden layer both ways, trains from scratch.

    Returns `n` (1..width) with the curves `local` and `global` (D after pruning to n neurons);
    `scratch_n` and `scratch` (D of the from-scratch networks) and `scratch_mse` (their training MSE);
    `dense_mse` and `target_var` (Var y); the iterates and losses of both algorithms
    (`local_iterates`, `local_losses`, `global_iterates`, `global_losses`); and the settings. By
    default local imitation may take 20 * width steps and global imitation 5 * width picks. Every network
    is trained and pruned on the `samples` points; D is measured on them too, or on `heldout` fresh points
    when given (the paper's D is an expectation over the data distribution). `noise` adds N(0, noise^2)
    to the training targets."""
    local_steps = 20 * width if local_steps is None else local_steps
    global_picks = 5 * width if global_picks is None else global_picks
    gen = torch.Generator().manual_seed(seed)
    x, y, x_eval = make_data(samples, gen, heldout, noise)
    dense = train(init_net(width, width, gen, middle), x, y, steps, lr, trainer)
    target = forward(dense, x_eval)

    local_it, local_loss = local_imitation(local_gram(dense, x), local_steps)
    global_it, global_loss = global_imitation(dense, x, global_picks)

    scratch, scratch_mse = [], []
    for n in scratch_widths:
        net = train(init_net(n, width, gen, middle), x, y, steps, lr, trainer)
        scratch.append(discrepancy(net, target, x_eval))
        scratch_mse.append(float(((forward(net, x) - y) ** 2).mean()))

    return {
        "n": np.arange(1, width + 1),
        "local": pruning_curve(dense, x_eval, local_it, local_loss),
        "global": pruning_curve(dense, x_eval, global_it, global_loss),
        "scratch_n": np.array(scratch_widths),
        "scratch": np.array(scratch),
        "scratch_mse": np.array(scratch_mse),
        "dense_mse": float(((forward(dense, x) - y) ** 2).mean()),
        "target_var": float(y.var()),
        "local_iterates": local_it,
        "local_losses": local_loss,
        "global_iterates": global_it,
        "global_losses": global_loss,
        "seed": seed,
        "width": width,
        "samples": samples,
        "steps": steps,
        "lr": lr,
        "trainer": trainer,
        "middle": middle,
        "heldout": heldout,
        "noise": noise,
    }


def fit_exponential(n: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    """Least squares log d = a - b n. Returns (a, b, R^2)."""
    return _fit_line(n.astype(float), np.log(d))


def fit_power(n: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    """Least squares log d = c - e log n. Returns (c, e, R^2)."""
    return _fit_line(np.log(n.astype(float)), np.log(d))


def _fit_line(t: np.ndarray, z: np.ndarray) -> tuple[float, float, float]:
    slope, intercept = np.polyfit(t, z, 1)
    residual = z - (intercept + slope * t)
    r2 = 1.0 - float(residual @ residual) / float(((z - z.mean()) ** 2).sum())
    return float(intercept), float(-slope), r2


def rates(res: dict) -> dict:
    """The exponential rates b of the pruning curves (n = 1..N-1) and the power d of training's; for
    comparison also a power-law fit of each pruning curve (`d_local`, `d_global` with their R^2)."""
    n = res["n"][:-1]
    out = {}
    for name in ("local", "global"):
        _, out[f"b_{name}"], out[f"r2_{name}"] = fit_exponential(n, res[name][:-1])
        _, out[f"d_{name}"], out[f"r2pow_{name}"] = fit_power(n, res[name][:-1])
    _, out["d_scratch"], out["r2_scratch"] = fit_power(res["scratch_n"], res["scratch"])
    return out


def table(res: dict) -> list[dict]:
    """One row per from-scratch width: D of local, global and from-scratch at that n."""
    return [
        {
            "n": int(n),
            "local": float(res["local"][n - 1]),
            "global": float(res["global"][n - 1]),
            "scratch": float(s),
        }
        for n, s in zip(res["scratch_n"], res["scratch"])
    ]


def verdict(res: dict, fit: dict, check_n: Sequence[int] = (16, 32), factor: float = 10.0) -> tuple[bool, list[str]]:
    """Checks the paper's claim. (1) Each pruning curve falls roughly exponentially: b > 0 and the
    exponential fit explains R^2 >= 0.9 of log D over n = 1..N-1. (2) At each n in `check_n`, each
    pruned network's D is at least `factor` times below the from-scratch network's."""
    lines, ok = [], True
    for name in ("local", "global"):
        good = fit[f"b_{name}"] > 0 and fit[f"r2_{name}"] >= 0.9
        ok = ok and good
        lines.append(
            f"[{'PASS' if good else 'FAIL'}] {name}: log D = a - b n with b = {fit[f'b_{name}']:.4f}, "
            f"R^2 = {fit[f'r2_{name}']:.3f} (needs b > 0, R^2 >= 0.9); power law log D = c - d log n: "
            f"d = {fit[f'd_{name}']:.3f}, R^2 = {fit[f'r2pow_{name}']:.3f}"
        )
    lines.append(
        f"[info] scratch: log D = c - d log n with d = {fit['d_scratch']:.3f}, R^2 = {fit['r2_scratch']:.3f} "
        f"(~1/n would be d = 1)"
    )
    by_n = {r["n"]: r for r in table(res)}
    for n in check_n:
        row = by_n[n]
        for name in ("local", "global"):
            good = row[name] * factor <= row["scratch"]
            ok = ok and good
            lines.append(
                f"[{'PASS' if good else 'FAIL'}] n = {n}: {name} D = {row[name]:.3g} "
                f"vs scratch {row['scratch']:.3g} "
                f"(ratio {row['scratch'] / row[name]:.3g}, needs >= {factor:g})"
            )
    lines.append(f"VERDICT: the paper's claim {'HOLDS' if ok else 'DOES NOT HOLD'} here")
    return ok, lines


def write_csv(res: dict, path: Path) -> None:
    """All n = 1..N for the pruning curves; the from-scratch columns are empty where not trained."""
    scratch = dict(zip(res["scratch_n"].tolist(), zip(res["scratch"], res["scratch_mse"])))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["n", "local", "global", "scratch", "scratch_train_mse"])
        for n, loc, glo in zip(res["n"], res["local"], res["global"]):
            trained = [f"{v:.6e}" for v in scratch[int(n)]] if int(n) in scratch else ["", ""]
            writer.writerow([int(n), f"{loc:.6e}", f"{glo:.6e}", *trained])


def plot(res: dict, fit: dict, path: Path) -> None:
    """Figure 1: D against n on a log scale, the two pruning curves and the from-scratch networks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(res["n"], res["local"], label=f"local imitation (b = {fit['b_local']:.3f})")
    ax.plot(res["n"], res["global"], label=f"global imitation (b = {fit['b_global']:.3f})")
    scratch_label = f"trained from scratch (d = {fit['d_scratch']:.2f})"
    ax.plot(res["scratch_n"], res["scratch"], marker="o", label=scratch_label)
    ax.set_yscale("log")
    ax.set_xlabel("neurons n in the first hidden layer")
    ax.set_ylabel("discrepancy D to the dense network")
    ax.set_title(f"Two tanh layers of {res['width']}, {res['samples']} simulated points")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/greedy_rate"))
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps for every trained network")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument(
        "--trainer",
        choices=("adam", "mf-gd"),
        default="adam",
        help="mf-gd: gradient descent in mean-field time (see `train`)",
    )
    parser.add_argument(
        "--middle-init",
        choices=("normal", "zero"),
        default="normal",
        help="zero: the middle layer V starts at 0 (see `init_net`)",
    )
    parser.add_argument("--scratch-widths", type=int, nargs="+", default=list(SCRATCH_WIDTHS))
    parser.add_argument(
        "--heldout",
        type=int,
        default=0,
        help="measure D on this many fresh points of the same distribution (0: on the training points)",
    )
    parser.add_argument(
        "--noise", type=float, default=0.0, help="standard deviation of noise added to the training targets"
    )
    parser.add_argument(
        "--input-dim", type=int, default=INPUT_DIM, help="dimension d of the simulated inputs x ~ N(0, I_d)"
    )
    args = parser.parse_args()
    globals()["INPUT_DIM"] = args.input_dim

    torch.set_num_threads(1)
    start = time.perf_counter()
    res = run(
        args.seed,
        args.width,
        args.samples,
        args.steps,
        args.lr,
        args.scratch_widths,
        trainer=args.trainer,
        middle=args.middle_init,
        heldout=args.heldout,
        noise=args.noise,
    )
    elapsed = time.perf_counter() - start
    fit = rates(res)

    noise = f" + noise {res['noise']:g}" if res["noise"] else ""
    heldout = f" (D on {res['heldout']} held-out points)" if res["heldout"] else ""
    print("Ye, Wu and Liu, Sec. 2.3 / Fig. 1 -- simulated data of our choice (the paper's appendix is lost)")
    print(
        f"x ~ N(0, I_{INPUT_DIM}), y = sum of {RIDGES} random sine ridges"
        f"{noise}, {res['samples']} points{heldout}; tanh layers "
        f"{res['width']}-{res['width']} (middle init {res['middle']}); {res['trainer']} {res['steps']} steps, "
        f"lr {res['lr']:g}; seed {res['seed']}; "
        f"{elapsed:.1f} s"
    )
    print(
        f"dense train MSE {res['dense_mse']:.3g} (Var y = {res['target_var']:.3g}); local imitation "
        f"{len(res['local_losses']) - 1} steps (adds/removals/re-weights "
        f"{'/'.join(map(str, step_kinds(res['local_iterates'])))}), "
        f"global imitation {len(res['global_losses'])} picks (at most {max_size(res['global_iterates'])} neurons)"
    )
    print(f"{'n':>4} {'local':>11} {'global':>11} {'scratch':>11} {'scratch MSE':>12}")
    for row, mse in zip(table(res), res["scratch_mse"]):
        print(f"{row['n']:4d} {row['local']:11.3e} {row['global']:11.3e} {row['scratch']:11.3e} {mse:12.3e}")
    _, lines = verdict(res, fit)
    print("\n".join(lines))

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(res, args.out / "results.csv")
    plot(res, fit, args.out / "fig1.png")
    print(f"wrote {args.out / 'results.csv'} and {args.out / 'fig1.png'}")


if __name__ == "__main__":
    main()
