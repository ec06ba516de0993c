"""The backends that run a step, and what they share.

* eager torch: torch.optim's own functional SGD/Adam plus the regularizers' passes
  (``regoptim._sgd_impl`` / ``regoptim._adam_impl``, ``regoptim.regularizers``);
* :mod:`.cpu`: the one-pass C++ kernel (``csrc/``), its install-time build and disk cache, the
  rounding of torch's kernels per CPU capability, and the per-group plans of the default path;
* Triton (``regoptim._kernels``, the top-level ``kernels/`` folder): CUDA, or CPU tensors under
  Triton's interpreter.

:mod:`.dispatch` sends ``fused=True`` to the C++ or the Triton backend; :mod:`.group_step` runs a
group-lasso step (update and group prox) in one call of either; :mod:`.guard` is what every call
that hands raw pointers to a kernel checks first.
"""
