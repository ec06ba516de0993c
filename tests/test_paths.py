"""regoptim.regularization_path: warm starts, the residual, and the ISTA path against
scikit-learn's lasso_path on a real lasso problem (the diabetes data)."""

from __future__ import annotations

import math

import pytest
import torch

import regoptim
from regoptim.workflow.paths import PathStep


def _least_squares(x, y):
    """``(1/(2n)) ||y - Xw||^2``: with ``l1=alpha`` it is sklearn's lasso objective."""

    def objective(model):
        return 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()

    n = x.shape[0]
    xtx, xty = x.T @ x / n, x.T @ y / n

    def ista(model, optimizer, epoch, steps=20):  # one "epoch": 20 full-batch ProxSGD steps
        for _ in range(steps):
            model.weight.grad = model.weight.detach() @ xtx - xty  # the objective's gradient
            optimizer.step()

    return objective, ista


def _linear(n_features, value=0.0):
    model = torch.nn.Linear(n_features, 1, bias=False, dtype=torch.float64)
    torch.nn.init.constant_(model.weight, value)
    return model


@pytest.fixture
def one_thread():
    """Two threads on a busy 2-core machine made this 5x slower (17 s against 3.5 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_warm_ista_path_matches_sklearn_lasso_path(diabetes, one_thread):
    np = pytest.importorskip("numpy")
    from sklearn.linear_model import lasso_path

    x, y = diabetes
    n = x.shape[0]
    lipschitz = float(torch.linalg.eigvalsh(x.T @ x / n).max())
    alpha_max = float((x.T @ y).abs().max() / n)  # the smallest alpha with w = 0
    alphas = alpha_max * np.geomspace(1.0, 1e-2, 8)
    sk_alphas, sk_coefs, _ = lasso_path(
        x.numpy(), y.numpy(), alphas=alphas, tol=1e-15, max_iter=1_000_000
    )
    objective, ista = _least_squares(x, y)
    model = _linear(x.shape[1])
    tol = 1e-9
    path = regoptim.regularization_path(
        model, list(alphas[::-1]), ista, objective, lr=1 / lipschitz, epochs=100_000, tol=tol
    )
    points = []
    for i, point in enumerate(path):
        assert point.strength == pytest.approx(sk_alphas[i], rel=1e-15)  # strongest first
        assert point.residual <= tol and point.epochs < 100_000
        coef = torch.tensor(sk_coefs[:, i])
        torch.testing.assert_close(model.weight.detach()[0], coef, rtol=0, atol=1e-6)
        assert torch.equal(model.weight.detach()[0] == 0, coef == 0)
        points.append(point)
    assert len(points) == len(alphas)
    assert points[0].epochs == 1  # w = 0 already solves alpha_max
    assert (sk_coefs[:, -1] != 0).sum() > (sk_coefs[:, 1] != 0).sum() > 0  # a real path


@pytest.mark.parametrize("warm_start", [True, False], ids=["warm", "cold"])
def test_each_point_starts_where_it_should(diabetes, warm_start):
    """Warm: from the previous point's solution; cold: from the weights at the call."""
    x, y = diabetes
    objective, ista = _least_squares(x[:100], y[:100])
    model = _linear(x.shape[1], value=0.5)
    initial = model.weight.detach().clone()
    starts = []

    def record_then_train(model, optimizer, epoch):
        if epoch == 0:
            starts.append(model.weight.detach().clone())
        ista(model, optimizer, epoch, steps=3)

    solutions = []
    path = regoptim.regularization_path(
        model,
        [1.0, 10.0, 0.1],
        record_then_train,
        objective,
        lr=0.05,
        epochs=2,
        warm_start=warm_start,
    )
    for point in path:
        assert isinstance(point, PathStep) and point.epochs == 2 and point.seconds > 0
        solutions.append((point.strength, model.weight.detach().clone()))
    assert [s for s, _ in solutions] == [10.0, 1.0, 0.1]
    expected = [initial, *(w for _, w in solutions[:-1])] if warm_start else [initial] * 3
    for got, want in zip(starts, expected, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(solutions[0][1], solutions[1][1])


def test_residual_is_zero_at_the_ridge_solution_and_the_gradient_norm_elsewhere(diabetes):
    x, y = diabetes
    n, d = x.shape
    wd = 0.3
    objective, _ = _least_squares(x, y)
    ridge = torch.linalg.solve(x.T @ x / n + wd * torch.eye(d, dtype=x.dtype), x.T @ y / n)

    def no_training(model, optimizer, epoch):
        pass

    gradient_at_zero = float(torch.linalg.norm(x.T @ y / n))
    for start, expected in ((ridge, 0.0), (torch.zeros(d, dtype=x.dtype), gradient_at_zero)):
        model = _linear(d)
        with torch.no_grad():
            model.weight[0] = start
        (point,) = regoptim.regularization_path(
            model, [wd], no_training, objective, lr=0.1, reg="weight_decay"
        )
        assert point.residual == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_l1_residual_vanishes_inside_the_threshold(diabetes):
    """At w = 0 the residual is 0 when every |gradient| <= l1 (w = 0 is the lasso solution)."""
    x, y = diabetes
    objective, _ = _least_squares(x, y)
    alpha_max = float((x.T @ y).abs().max() / x.shape[0])

    def no_training(model, optimizer, epoch):
        pass

    for l1, zero in ((alpha_max, True), (0.9 * alpha_max, False)):
        (point,) = regoptim.regularization_path(
            _linear(x.shape[1]), [l1], no_training, objective, lr=0.1
        )
        assert (point.residual == 0.0) is zero


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strengths": []}, "strengths is empty"),
        ({"strengths": [1e-3, -1.0]}, "strengths must be finite and >= 0, got -1.0"),
        ({"strengths": [math.nan]}, "strengths must be finite and >= 0, got nan"),
        ({"reg": "l2"}, "reg must be 'l1' or 'weight_decay', got 'l2'"),
        ({"lr": 0.0}, "lr must be finite and > 0, got 0.0"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"epochs": 2.5}, "epochs must be an integer >= 1, got 2.5"),
        ({"tol": -1.0}, "tol must be >= 0 or None, got -1.0"),
    ],
)
def test_bad_arguments_raise_at_the_call(kwargs, match):
    args = {"strengths": [1e-3], "lr": 0.1, **kwargs}
    strengths = args.pop("strengths")
    with pytest.raises(ValueError, match=f"regularization_path: {match}"):
        regoptim.regularization_path(  # no iteration: the error comes at the call
            _linear(3), strengths, lambda m, o, e: None, lambda m: m.weight.sum(), **args
        )
