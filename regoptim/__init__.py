"""regoptim: drop-in torch.optim optimizers with exact, fast regularization.

Coupled L2 (``weight_decay``), decoupled weight decay (``decoupled_weight_decay=True``, as AdamW)
and proximal L1 soft-thresholding (``l1``: exact zeros).
"""

from regoptim.adam import ProxAdam, ProxAdamW
from regoptim.prox import soft_threshold, soft_threshold_
from regoptim.sgd import ProxSGD

__all__ = ["ProxAdam", "ProxAdamW", "ProxSGD", "soft_threshold", "soft_threshold_"]
__version__ = "0.1.0"
