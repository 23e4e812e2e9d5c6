"""Low-precision matmuls: the per-step products of the factored algorithms in a cheaper dtype.

``matmul_dtype`` (a per-group hyperparameter of every factored preset) casts the operands of
the statistics products (``G G^T``, ``G^T G``, KL's weighted products) and of the projections
into and out of the eigenbasis to that dtype; each product's result is cast back to the state
dtype before it is used, so factors, moments and bases stay in float32 (or float64), and
eigendecompositions, QR steps and staleness checks run in the state dtype.

On CPU (torch 2.13) a bfloat16 ``matmul`` accumulates in float32 and rounds its result to
bfloat16; that rounding (8 bits of mantissa) is what the factor EMA absorbs. On AMX CPUs and
tensor-core GPUs bfloat16 products run several times faster than float32 ones
(``benchmarks/roofline.py`` measures it).

float16 is refused: ``G G^T`` overflows float16's 65504 for gradients the engine's screen
accepts (it checks ``||G||_F^2`` against the state dtype), so a float16 path would need its
own scaling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["MATMUL_DTYPES", "check_matmul_dtype", "matmul_dtype_of", "product"]

#: The accepted values of ``matmul_dtype`` besides None (the state dtype).
MATMUL_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def check_matmul_dtype(value: Any) -> torch.dtype | None:
    """``value`` as a dtype (None: the state dtype); a ValueError names the accepted values."""
    if value is None:
        return None
    if isinstance(value, str) and value in MATMUL_DTYPES:
        return MATMUL_DTYPES[value]
    if isinstance(value, torch.dtype) and value in MATMUL_DTYPES.values():
        return value
    raise ValueError(
        f"matmul_dtype must be None (the state dtype), 'bfloat16', 'float32' or the torch dtype, got {value!r}"
        + (" (float16 products of gradients overflow at 65504)" if value in ("float16", torch.float16) else "")
    )


def matmul_dtype_of(config: Any) -> torch.dtype | None:
    """The dtype a group's products run in (None: the state dtype)."""
    return check_matmul_dtype(getattr(config, "matmul_dtype", None))


def product(*operands: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``operands[0] @ operands[1] @ ...``, computed in ``dtype`` (None: as they are), the result
    in the first operand's dtype."""
    out_dtype = operands[0].dtype
    if dtype is None or dtype == out_dtype:
        result = operands[0]
        for operand in operands[1:]:
            result = result @ operand
        return result
    result = operands[0].to(dtype)
    for operand in operands[1:]:
        result = result @ operand.to(dtype)
    return result.to(out_dtype)
