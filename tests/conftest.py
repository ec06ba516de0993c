"""Test-session setup.

Triton's interpreter must be chosen before triton is first imported (torch.compile may import
it), so it is set here, before any test module loads. Under it, ``fused=True`` on CPU tensors runs
the Triton kernels in the interpreter; tests of the fused C++ CPU kernel set
``TRITON_INTERPRET=0`` with monkeypatch (the backend is chosen per call).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def diabetes():
    """scikit-learn's diabetes data, standardized features and centred target, float64 (the
    lasso tests: ISTA against sklearn's Lasso and lasso_path)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    return x, y - y.mean()
