"""Pallas kernels for fused low-rank and structured-sparse updates (`jft.pallas_kernels`).

Every kernel here sits beside an XLA reference implementation of the same function.
"""
