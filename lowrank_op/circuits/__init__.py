"""The ``circuits`` application: attention-head circuits of transformer checkpoints, measured from
their factors (``python -m lowrank_op circuits``).

The library (``lowrank_op`` outside this subpackage) never imports it. Its modules:

=====================  =================================================================
``analysis``           the OV and QK circuits and what is measured on them (:func:`analyze`)
``checkpoints``        reading a checkpoint into :class:`AttentionWeights`
``report``             the table, CSV, JSON and plots
``cli``                the command line
``memory``             resident-memory probes for the command's memory line
=====================  =================================================================

Its optional dependencies are the extras ``weights`` (safetensors), ``plots`` (matplotlib) and
``progress`` (tqdm).
"""

from lowrank_op.circuits.analysis import (
    CircuitMetrics,
    CircuitReport,
    analyze,
    circuit_metrics,
    copying_score,
    effective_rank,
    eigenvalue_positivity,
    ov_circuit,
    qk_circuit,
)

__all__ = [
    "CircuitMetrics",
    "CircuitReport",
    "analyze",
    "circuit_metrics",
    "copying_score",
    "effective_rank",
    "eigenvalue_positivity",
    "ov_circuit",
    "qk_circuit",
]
