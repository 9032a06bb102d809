"""Kernels behind the compiled backends.

``fastsam.kernels.triton``: the Triton multi-tensor kernels used by
``fastsam.backends.triton`` (one op per file, one shared launcher).
"""
