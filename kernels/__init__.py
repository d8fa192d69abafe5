"""Triton kernels of fastp2phd, importable only as ``fastp2phd.kernels``.

One module per op (``instance_norm_act``, ``instance_mean``) holding its kernels
and launchers; the op's contract and reference live in ``fastp2phd/ops/``.
"""
