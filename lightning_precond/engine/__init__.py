"""The engine every algorithm shares, one module per concern:

* :mod:`.optimizer` -- step orchestration (gather -> algorithm per bucket -> scatter -> vectors);
* :mod:`.buckets` -- owned blocks of one shape, their stacked state and host-side records;
* :mod:`.refresh` -- the refresh policy (periodic / adaptive / external owner), failures;
* :mod:`.stats` -- preconditioner health on demand;
* :mod:`.checkpoint` -- the state-dict codec (the only code that knows the block layout);
* :mod:`.groups` -- param-group keys: the per-group plan options, unknown keys refused;
* :mod:`.vectors` -- AdamW for vectors, through torch's functional kernel.
"""

from .optimizer import PreconditionedOptimizer
from .refresh import RefreshedFactor
from .stats import FactorStats

__all__ = ["PreconditionedOptimizer", "FactorStats", "RefreshedFactor"]
