"""Experiments over many runs: sweeps (:mod:`~raflora.experiments.sweep`), multi-seed comparisons
and their reports (:mod:`~raflora.experiments.report`), statistics over seeds
(:mod:`~raflora.experiments.stats`) and the device checks (:mod:`~raflora.experiments.gpu_check`).
"""
