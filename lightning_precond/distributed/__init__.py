"""Routing between the backend's storage and the owners of blocks.

The router is the only code that knows a backend (single process, DDP, FSDP, ZeRO): it hands
each owner the full gradient of its blocks and applies the finished updates wherever the
backend keeps the parameters.
"""

from .detect import resolve_router
from .router import BlockUpdate, LocalRouter, Router

__all__ = ["BlockUpdate", "LocalRouter", "Router", "resolve_router"]
