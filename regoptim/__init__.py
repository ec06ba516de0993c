"""regoptim: drop-in torch.optim optimizers with exact, fast regularization.

Coupled L2 (``weight_decay``), decoupled weight decay (``decoupled_weight_decay=True``, as AdamW)
and proximal L1 soft-thresholding (``l1``: exact zeros), plus the workflow around them:
parameter groups that exempt biases and norms, penalties, sparsity reports, warm-started
regularization paths (plots live in ``regoptim.plots``).
"""

from regoptim.adam import ProxAdam, ProxAdamW
from regoptim.groups import param_groups
from regoptim.paths import regularization_path
from regoptim.penalties import l1_penalty, l2_penalty
from regoptim.prox import soft_threshold, soft_threshold_
from regoptim.sgd import ProxSGD
from regoptim.sparsity import SparsityReport, SparsityRow, sparsity

__all__ = [
    "ProxAdam",
    "ProxAdamW",
    "ProxSGD",
    "SparsityReport",
    "SparsityRow",
    "l1_penalty",
    "l2_penalty",
    "param_groups",
    "regularization_path",
    "soft_threshold",
    "soft_threshold_",
    "sparsity",
]
__version__ = "0.1.0"
