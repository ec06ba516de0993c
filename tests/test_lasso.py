"""ProxSGD as ISTA: full-batch proximal gradient on a real lasso problem (scikit-learn's diabetes
data) reaches the lasso solution, checked by its optimality conditions and against sklearn."""

from __future__ import annotations

import pytest
import torch

import regoptim


@pytest.mark.slow
@pytest.mark.parametrize(
    "impl", [{"foreach": False}, {"foreach": True}, {}], ids=["loop", "foreach", "default"]
)
def test_ista_meets_lasso_optimality(diabetes, impl):
    x, y = diabetes
    n = x.shape[0]
    lam = 2.0
    lipschitz = float(torch.linalg.eigvalsh(x.T @ x / n).max())
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = regoptim.ProxSGD([w], lr=1.0 / lipschitz, l1=lam, **impl)
    for _ in range(3000):
        opt.zero_grad()
        loss = 0.5 * ((x @ w - y) ** 2).mean()  # 1/(2n) ||Xw - y||^2
        loss.backward()
        opt.step()
    with torch.no_grad():
        grad = x.T @ (x @ w - y) / n
        zero = w == 0
        assert 0 < int(zero.sum()) < w.numel()  # a sparse, non-trivial solution
        # KKT: |grad_i| <= lam where w_i = 0, grad_i = -lam * sign(w_i) elsewhere
        assert bool((grad[zero].abs() <= lam + 1e-9).all())
        torch.testing.assert_close(grad[~zero], -lam * torch.sign(w[~zero]), rtol=0, atol=1e-8)

    from sklearn.linear_model import Lasso

    sk = Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(
        x.numpy(), y.numpy()
    )
    torch.testing.assert_close(w.detach(), torch.tensor(sk.coef_), rtol=0, atol=1e-6)
    assert torch.equal(w.detach() == 0, torch.tensor(sk.coef_) == 0)
