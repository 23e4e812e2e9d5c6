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

float16 has three more mantissa bits than bfloat16 but a range that ends at 65504, which
``G G^T`` of a gradient the engine's screen accepts can exceed. So a float16 product scales
each operand (per matrix of a stack) by a power of two that brings its Frobenius norm to at
most 128: the entries of a product of two such operands are then at most ``128^2 = 2^14``
(Cauchy-Schwarz), and entries down to ``2^-24`` of the scaled norm (about ``3e-10`` of the
norm) survive as float16 subnormals. A chain rescales its intermediate the same way, and the
result is unscaled in the state dtype. Powers of two make the scaling itself exact. Speed:
on GPUs both low-precision dtypes use the tensor cores; on an AVX-512 CPU without AMX the
batched float16 products ran at the float32 speed and bfloat16 ones at 0.6x of it
(``benchmarks/results/roofline_avx512_*``), so there neither mode saves time.

``"tf32"`` keeps float32 operands and lets CUDA's tensor cores take them as TF32. TF32 is a
backend setting, not a dtype, so each of these products runs inside :func:`tf32_matmuls`,
which sets ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` and restores the caller's
setting after the product: the model's own matmuls, eigendecompositions and QR steps keep
whatever the user chose. On CPU the flag does nothing and the products are exact float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Union

import torch
from torch import Tensor

__all__ = ["FLOAT16_OPERAND_NORM", "MATMUL_DTYPES", "TF32", "MatmulPrecision", "check_matmul_dtype",
           "matmul_dtype_of", "power_of_two_scale", "product", "tf32_matmuls"]

#: The accepted values of ``matmul_dtype`` besides None (the state dtype) and :data:`TF32`.
MATMUL_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                         "float32": torch.float32}
#: float32 products that CUDA may run as TF32 (see the module docstring).
TF32 = "tf32"
#: What the products run in: a dtype, :data:`TF32`, or None (the state dtype).
MatmulPrecision = Union[torch.dtype, Literal["tf32"], None]


def check_matmul_dtype(value: Any) -> MatmulPrecision:
    """``value`` as a dtype or :data:`TF32` (None: the state dtype); a ValueError names the
    accepted values."""
    if value is None or value == TF32:
        return value
    if isinstance(value, str) and value in MATMUL_DTYPES:
        return MATMUL_DTYPES[value]
    if isinstance(value, torch.dtype) and value in MATMUL_DTYPES.values():
        return value
    raise ValueError(
        "matmul_dtype must be None (the state dtype), 'bfloat16', 'float16', 'float32', 'tf32' or the "
        f"torch dtype, got {value!r}"
    )


def matmul_dtype_of(config: Any) -> MatmulPrecision:
    """What a group's products run in (None: the state dtype)."""
    return check_matmul_dtype(getattr(config, "matmul_dtype", None))


@contextmanager
def tf32_matmuls() -> Iterator[None]:
    """CUDA float32 matmuls may use TF32 inside; the caller's setting is restored on exit."""
    backend = torch.backends.cuda.matmul
    previous = backend.fp32_precision
    backend.fp32_precision = "tf32"
    try:
        yield
    finally:
        backend.fp32_precision = previous


def product(*operands: Tensor, dtype: MatmulPrecision = None) -> Tensor:
    """``operands[0] @ operands[1] @ ...``, computed in ``dtype`` (None: as they are; :data:`TF32`:
    as they are, inside :func:`tf32_matmuls`; float16: power-of-two scaled, see the module
    docstring), the result in the first operand's dtype."""
    if dtype == TF32:
        with tf32_matmuls():
            return product(*operands)
    out_dtype = operands[0].dtype
    if dtype is None or dtype == out_dtype:
        result = operands[0]
        for operand in operands[1:]:
            result = result @ operand
        return result
    if dtype == torch.float16:
        return _scaled_float16_product(operands, out_dtype)
    result = operands[0].to(dtype)
    for operand in operands[1:]:
        result = result @ operand.to(dtype)
    return result.to(out_dtype)


#: Each float16 operand's Frobenius norm is scaled to at most this (module docstring).
FLOAT16_OPERAND_NORM = 128.0


def power_of_two_scale(x: Tensor) -> Tensor:
    """Per matrix of the stack ``x``: the largest power of two ``s`` with ``||s x||_F <= 128``,
    float32, shaped ``[..., 1, 1]``; 1 for a zero or non-finite matrix (left as it is,
    so a non-finite value still shows in the result)."""
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    scale = torch.exp2(torch.floor(torch.log2(FLOAT16_OPERAND_NORM / norm)))
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def _to_scaled_float16(x: Tensor) -> tuple[Tensor, Tensor]:
    scale = power_of_two_scale(x)
    return (x.to(scale.dtype) * scale).to(torch.float16), scale


def _scaled_float16_product(operands: tuple[Tensor, ...], out_dtype: torch.dtype) -> Tensor:
    result, scale = _to_scaled_float16(operands[0])
    for k, operand in enumerate(operands[1:], start=2):
        right, right_scale = _to_scaled_float16(operand)
        result, scale = result @ right, scale * right_scale
        if k < len(operands):  # bring the intermediate back under the bound for the next product
            result, rescale = _to_scaled_float16(result)
            scale = scale * rescale
    return result.to(out_dtype) / scale.to(out_dtype)
