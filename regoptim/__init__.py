"""regoptim: drop-in torch.optim optimizers with exact, fast regularization.

Coupled L2 (``weight_decay``), decoupled weight decay (``decoupled_weight_decay=True``, as AdamW),
proximal L1 soft-thresholding (``l1``: exact zeros) and group lasso (``group_l1``: whole neurons
or filters at exact zero), plus the workflow around them (:mod:`regoptim.workflow`, a client
of the optimizers): parameter groups that exempt biases and norms, penalties, sparsity reports,
warm-started regularization paths, structured groups and slim (plots live in
``regoptim.workflow.plots``).
"""

from regoptim.adam import ProxAdam
from regoptim.adamw import ProxAdamW
from regoptim.regularizers.l1 import soft_threshold, soft_threshold_
from regoptim.sgd import ProxSGD
from regoptim.workflow.groups import param_groups
from regoptim.workflow.paths import regularization_path
from regoptim.workflow.penalties import l1_penalty, l2_penalty
from regoptim.workflow.schedules import ParamGroupSchedule, schedule
from regoptim.workflow.sparsity import GroupSparsityRow, SparsityReport, SparsityRow, sparsity
from regoptim.workflow.sparsity_target import SparsityTarget, count_zero_groups
from regoptim.workflow.structure import SlimReport, UntraceableModelError, slim, structured_groups

__all__ = [
    "GroupSparsityRow",
    "ProxAdam",
    "ProxAdamW",
    "ParamGroupSchedule",
    "ProxSGD",
    "SparsityReport",
    "SlimReport",
    "SparsityRow",
    "SparsityTarget",
    "UntraceableModelError",
    "count_zero_groups",
    "l1_penalty",
    "l2_penalty",
    "param_groups",
    "regularization_path",
    "schedule",
    "slim",
    "soft_threshold",
    "soft_threshold_",
    "sparsity",
    "structured_groups",
]
__version__ = "0.1.0"
