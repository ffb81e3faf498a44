"""Tensor parallelism of one replica: process groups (state.py), the step message and
the rank loop (ranks.py)."""
