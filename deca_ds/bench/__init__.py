"""Measuring deca_ds against full Adam: a memory planner (:mod:`.planner`) and a benchmark (:mod:`.benchmark`).

Both are user-facing through the ``deca-ds plan`` and ``deca-ds bench`` commands; the benchmark's per-method work
runs in fresh processes (:mod:`.worker`) so that peak-memory figures are not polluted by earlier methods.
"""
