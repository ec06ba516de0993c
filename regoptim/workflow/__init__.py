"""The workflow around the optimizers: a client of them, never imported by them.

Parameter groups (:mod:`~regoptim.workflow.groups`), penalties, sparsity reports and the
sparsity target, schedules of param-group keys, regularization paths, structured groups and
slim (:mod:`~regoptim.workflow.structure`), plots (:mod:`~regoptim.workflow.plots`, needs
matplotlib), and the ``regoptim`` command (:mod:`~regoptim.workflow.cli`) with its experiments
(:mod:`~regoptim.workflow.train`, :mod:`~regoptim.workflow.compare`,
:mod:`~regoptim.workflow.paths`, :mod:`~regoptim.workflow.prune`). The public names are
re-exported by :mod:`regoptim`; this package exports nothing itself, so that each submodule
(``regoptim.workflow.sparsity`` included) is reached by its name.
"""
