"""Matrix-preconditioned optimizers (Shampoo, SOAP, KL-Shampoo, ...) for PyTorch Lightning
and Accelerate, with Kronecker factor state sharded across ranks by whole blocks."""

from .engine import EngineOptions, FactorStats, PreconditionedOptimizer, Recipe, RefreshedFactor
from .optimizers import KLSOAP, SOAP, EigenvalueCorrectedShampoo, KLShampoo, Shampoo

__all__ = [
    "SOAP",
    "Shampoo",
    "KLShampoo",
    "KLSOAP",
    "EigenvalueCorrectedShampoo",
    "PreconditionedOptimizer",
    "Recipe",
    "EngineOptions",
    "FactorStats",
    "RefreshedFactor",
]

__version__ = "0.1.0"
