"""Evaluation: the robustness report (:mod:`robust.evaluation.report`, written by :mod:`robust.evaluation.render`,
sharded by :mod:`robust.evaluation.sharding`) and the single-image flow (:mod:`robust.evaluation.fool`)."""
