"""Scaling studies: FLOP accounting (`flops`) for MFU and the x-axis of scaling plots.

Submodules are imported explicitly (e.g. `from vitok_jax.scaling import flops`); nothing heavy here.
"""
