"""Compute kernels shared by the backends (pure torch on CPU)."""
