"""The regularizers, one module each, every form of one regularizer found together.

========================  ==========================  ======================================
regularizer               eager torch form            reference, C++ and Triton forms
========================  ==========================  ======================================
decoupled weight decay    :mod:`.weight_decay`        ``reference.sgd_step``/``adam_step``;
                                                      the kernels' ``decay`` scalar
L1 (``l1``)               :mod:`.l1`                  ``reference.soft_threshold_ref``;
                                                      ``soft_threshold`` in ``csrc/elementwise.h``
                                                      and ``kernels/_jit.py``
group lasso (``group_l1``) :mod:`.group_lasso`        ``reference.group_prox_ref``;
                                                      ``csrc/group_lasso.h``, ``group_poly.h``,
                                                      ``kernels/_group.py``
========================  ==========================  ======================================

Each module's docstring carries the math; :mod:`.metric` holds Adam's diagonal metric that the L1
and group-lasso proxes of ProxAdam share. Coupled L2 is torch.optim's ``weight_decay``, inside the
update itself. The optimizer families (:mod:`regoptim.sgd`, :mod:`regoptim.adam`) take a
regularizer's hyperparameters from their record (:mod:`regoptim.hyper`) and call its form for the
backend that runs the step.
"""
