"""Matrix-preconditioned optimizers (Shampoo, SOAP, KL-Shampoo, Muon, ...) for PyTorch
Lightning and Accelerate, with preconditioner state sharded across ranks by whole blocks."""

from .engine import FactorStats, PreconditionedOptimizer, RefreshedFactor
from .engine.shards import sharded_state_dict
from .groups import param_groups, param_roles
from .optimizers import ASGO, KLSOAP, SOAP, EigenvalueCorrectedShampoo, KLShampoo, Muon, Shampoo
from .options import EngineOptions, EngineOptionsDict

__all__ = [
    "SOAP",
    "Shampoo",
    "KLShampoo",
    "KLSOAP",
    "EigenvalueCorrectedShampoo",
    "Muon",
    "ASGO",
    "PreconditionedOptimizer",
    "EngineOptions",
    "EngineOptionsDict",
    "FactorStats",
    "RefreshedFactor",
    "sharded_state_dict",
    "param_groups",
    "param_roles",
]

__version__ = "0.1.0"
