"""The fused C++ CPU backend: ``csrc/`` (the kernel), :mod:`.build` (install-time variants, JIT
fallback, private verified cache), :mod:`.kernel` (pointer tables and calls), :mod:`.plan`
(per-group plans of the default path), :mod:`.capability` (torch's CPU kernel numerics)."""
