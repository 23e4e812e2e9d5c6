"""Algorithms and the parts they are composed of.

* :mod:`.base` -- the per-bucket protocol the engine calls, typed group configs;
* :mod:`.statistics` -- Kronecker factors (one-sided, KL two-sided);
* :mod:`.eigenbasis` -- basis refresh methods (eigh, power/QR step, warm-started QR algorithm);
* :mod:`.scaling` -- inverse roots, Adam in the basis, eigenvalue-corrected, KL eigenvalues;
* :mod:`.grafting` -- Shampoo's grafted step sizes;
* :mod:`.kronecker` -- the Kronecker family as compositions of the above, in two step orders;
* :mod:`.muon` -- Newton–Schulz orthogonalized momentum.
"""

from .base import Algorithm, Direction, GroupConfig, StepContext
from .kronecker import BasisFirst, EigenbasisConfig, ShampooConfig, StatisticsFirst
from .muon import MuonConfig, Orthogonalized

__all__ = [
    "Algorithm", "Direction", "GroupConfig", "StepContext",
    "BasisFirst", "StatisticsFirst", "EigenbasisConfig", "ShampooConfig",
    "MuonConfig", "Orthogonalized",
]
