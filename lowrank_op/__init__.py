"""lowrank_op: products of two thin factors, kept factored.

``FactoredMatrix(A, B)`` is ``A @ B`` as a linear_operator ``LinearOperator`` with
TransformerLens's ``FactoredMatrix`` surface and decompositions that never form the product.
"""

from lowrank_op.errors import IllConditionedWarning, KrylovFailure, PerformanceWarning, UndefinedGradientWarning
from lowrank_op.factored import FactoredMatrix
from lowrank_op.added_diag import FactoredAddedDiag
from lowrank_op.outer_factored import OuterFactoredMatrix
from lowrank_op.scores import composition_scores
from lowrank_op import choices, diag_routing, errors, settings

diag_routing.install()  # ``DiagLinearOperator(d) + fm`` becomes a FactoredAddedDiag; see lowrank_op.diag_routing

__version__ = "0.1.0"

__all__ = [
    "FactoredMatrix",
    "FactoredAddedDiag",
    "OuterFactoredMatrix",
    "IllConditionedWarning",
    "KrylovFailure",
    "PerformanceWarning",
    "UndefinedGradientWarning",
    "composition_scores",
    "choices",
    "errors",
    "settings",
    "__version__",
]
