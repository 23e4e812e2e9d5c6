"""Lightning callbacks for preconditioned optimizers, and the logic they share with
:mod:`lightning_precond.accelerate`.

* :class:`RootRecomputeScheduler` -- owns *when* eigenbases / roots are recomputed
  (fixed frequency, warm-up then sparse, a callable, or the algorithm's default).
* :class:`AdaptiveEigenbasisRefresh` -- owns the schedule too, refreshing only stale factors.
* :class:`EigenStalenessMonitor` -- logs staleness and refresh statistics.

The framework-free pieces (:class:`RefreshSchedule`, :class:`ScheduledRefresh`,
:class:`AdaptiveRefresh`, :class:`StalenessReport`) hold the decisions, actions and
resumable counters; the callbacks and the Accelerate hooks only call them.
"""

from ._core import (
    AdaptiveRefresh,
    RefreshSchedule,
    ScheduledRefresh,
    StalenessReport,
    preconditioned_optimizers,
    unwrap_optimizer,
)
from .monitor import EigenStalenessMonitor
from .refresh import AdaptiveEigenbasisRefresh, RootRecomputeScheduler

__all__ = [
    "RootRecomputeScheduler",
    "AdaptiveEigenbasisRefresh",
    "EigenStalenessMonitor",
    "RefreshSchedule",
    "ScheduledRefresh",
    "AdaptiveRefresh",
    "StalenessReport",
    "preconditioned_optimizers",
    "unwrap_optimizer",
]
