"""Dense float64 reference implementations, written from ../shared/algorithms.md.

Each works on one full matrix with plain ``torch.linalg`` calls and no code from the
package, so agreement with the optimizers is evidence, not an echo.

``identity`` names the sides left unpreconditioned (algorithms.md: "left unpreconditioned on
that axis (identity factor: SOAP's way)"): that side's basis is I and never refreshed, its
eigenvalues count as 1, and it keeps no factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GradFn = Callable[[Tensor], Tensor]


def eigh_desc(a: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(a)
    return values.flip(-1), vectors.flip(-1)


def matrix_power_sym(a: Tensor, power: float, eps: float) -> Tensor:
    values, vectors = torch.linalg.eigh(a)
    return vectors @ torch.diag((values.clamp_min(0) + eps) ** power) @ vectors.T


def soap_refresh(factor: Tensor, basis: Tensor, shift: bool = False) -> tuple[Tensor, Tensor]:
    """Sort by the Rayleigh quotients, then one QR power step (``shift``: HeavyBall's shifted
    step, :func:`shifted_qr`). Returns (new basis, order)."""
    order = torch.argsort(torch.diag(basis.T @ factor @ basis), descending=True)
    if shift:
        return shifted_qr(factor, basis[:, order]), order
    return torch.linalg.qr(factor @ basis[:, order]).Q, order


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype)


def soap(w: Tensor, grad_fn: GradFn, steps: int, lr: float, b1: float, b2: float,
         bs: float, eps: float, wd: float, freq: int, identity: tuple[str, ...] = (),
         shift: bool = False) -> list[Tensor]:
    """SOAP (nikhilvyas/SOAP ``soap.py``; ``shift``: our default mode's shifted refresh):
    returns W after each update (the first call builds the basis only)."""
    g = grad_fn(w)
    left, right = (1 - bs) * g @ g.T, (1 - bs) * g.T @ g
    ql = _eye(w.shape[0], w) if "left" in identity else eigh_desc(left)[1]
    qr = _eye(w.shape[1], w) if "right" in identity else eigh_desc(right)[1]
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(w)
        gt = ql.T @ g @ qr
        m = b1 * m + (1 - b1) * gt
        v = b2 * v + (1 - b2) * gt * gt
        alpha = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
        w = w - alpha * (ql @ (m / (v.sqrt() + eps)) @ qr.T)
        w = w - lr * wd * w
        left = bs * left + (1 - bs) * g @ g.T
        right = bs * right + (1 - bs) * g.T @ g
        if t % freq == 0:
            new_l, new_r = ql, qr
            if "left" not in identity:
                new_l, order_l = soap_refresh(left, ql, shift)
                v = v[order_l, :]
            if "right" not in identity:
                new_r, order_r = soap_refresh(right, qr, shift)
                v = v[:, order_r]
            m = new_l.T @ (ql @ m @ qr.T) @ new_r
            ql, qr = new_l, new_r
        out.append(w)
    return out


def kl_inverse(lam: Tensor, cap_value: float | None = 4000, reference: bool = False) -> Tensor:
    """1 / lambda under the clamp lambda^{-1/2} <= max(10, min(d, cap_value)). KL-Methods maps a
    non-finite lambda^{-1/2} to 0 before clamping (``reference``); ours clamps first."""
    cap = None if cap_value is None else max(10, min(lam.shape[0], cap_value))
    inv_sqrt = lam.clamp_min(0) ** -0.5
    if reference:
        inv_sqrt = torch.nan_to_num(inv_sqrt, nan=0.0, posinf=0.0)
        return (inv_sqrt if cap is None else torch.clamp(inv_sqrt, max=cap)) ** 2
    if cap is not None:
        inv_sqrt = torch.clamp(inv_sqrt, max=cap)
    return torch.nan_to_num(inv_sqrt, nan=0.0, posinf=0.0) ** 2


def shifted_qr(factor: Tensor, basis: Tensor) -> Tensor:
    """The shifted power step qr((A + c max|diag(Q^T A Q)| I) Q), c = max(1e-8, min(4 d eps, 1/8))
    (HeavyBall 3.2's with 4 for its 64)."""
    c = max(1e-8, min(4 * factor.shape[0] * torch.finfo(factor.dtype).eps, 0.125))
    lift = c * torch.diag(basis.T @ factor @ basis).abs().max()
    return torch.linalg.qr((factor + lift * torch.eye(factor.shape[0], dtype=factor.dtype)) @ basis).Q


def kl_shampoo(w: Tensor, grad_fn: GradFn, steps: int, lr: float, b1: float, beta: float,
               eps: float, wd: float, freq: int, adam: tuple[float, float] | None = None,
               identity: tuple[str, ...] = (), reference: bool = True, debias: bool = False,
               init: float | str = 0.1, shift: bool = False, sort: bool = False,
               bias_correction: bool = False, decay_after: bool = True) -> list[Tensor]:
    """KL-Shampoo, or KL-SOAP when ``adam=(b1, b2)`` is given (Adam in the eigenbasis), as
    yorkerlin/KL-Methods ``optim/kl_opt.py`` computes it (``reference``: its clamp order, and
    the clamped eigenvalues stored), with the options of our default mode: ``debias`` (EMA
    coefficient 1 - (1 - beta) / (1 - beta^(t+1))), ``init="gradient"`` (lambda = rms(G)),
    ``shift`` (shifted QR), ``sort`` (SOAP's sort at refresh, V and lambda permuted),
    ``bias_correction`` (KL-SOAP's Adam step size) and the decay order. An identity side is
    S = I (lambda = 1) held fixed."""
    m_rows, n_cols = w.shape
    left, right = "left" not in identity, "right" not in identity
    g = grad_fn(w)
    b0 = 0.0 if debias else beta
    sa = (1 - b0) / n_cols * g @ g.T
    sb = (1 - b0) / m_rows * g.T @ g
    qa = eigh_desc(sa)[1] if left else _eye(m_rows, w)
    qb = eigh_desc(sb)[1] if right else _eye(n_cols, w)
    c0 = float(torch.sqrt((g * g).mean())) if init == "gradient" else init
    la = torch.full((m_rows,), c0 if left else 1.0, dtype=w.dtype)
    lb = torch.full((n_cols,), c0 if right else 1.0, dtype=w.dtype)
    unit_a, unit_b = not left, not right  # an identity side's lambda stays 1 (no clamp either)

    def inverse(lam: Tensor, unit: bool) -> Tensor:
        return torch.ones_like(lam) if unit else kl_inverse(lam, reference=reference)

    def refresh(s: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.argsort(torch.diag(q.T @ s @ q), descending=True) if sort else torch.arange(q.shape[0])
        q = q[:, order]
        return (shifted_qr(s, q) if shift else torch.linalg.qr(s @ q).Q), order

    mom = torch.zeros_like(w)
    v = torch.zeros_like(w)
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(w)
        bt = 1 - (1 - beta) / (1 - beta ** (t + 1)) if debias else beta
        if adam is None:
            mom = b1 * mom + (1 - b1) * g
            ia, ib = inverse(la, unit_a), inverse(lb, unit_b)
            p = 1.0 / (torch.outer(ia, ib).rsqrt() + eps)
            update = qa @ ((qa.T @ mom @ qb) * p) @ qb.T
            alpha = lr
        else:
            a1, a2 = adam
            gt = qa.T @ g @ qb
            mom = a1 * mom + (1 - a1) * gt
            v = a2 * v + (1 - a2) * gt * gt
            alpha = lr * (1 - a2**t) ** 0.5 / (1 - a1**t) if bias_correction else lr
            update = qa @ (mom / (v.sqrt() + eps)) @ qb.T
        w = (w - alpha * update) * (1 - lr * wd) if decay_after else (1 - lr * wd) * w - alpha * update
        ia, ib = inverse(la, unit_a), inverse(lb, unit_b)
        sa = bt * sa + (1 - bt) / n_cols * g @ qb @ torch.diag(ib) @ qb.T @ g.T
        sb = bt * sb + (1 - bt) / m_rows * g.T @ qa @ torch.diag(ia) @ qa.T @ g
        gt2 = (qa.T @ g @ qb) ** 2
        new_la, new_lb = (bt * la + (1 - bt) / n_cols * gt2 @ ib,
                          bt * lb + (1 - bt) / m_rows * ia @ gt2)
        if reference:  # KL-Methods keeps lambda^{-1/2} clamped: the floor feeds the next step
            new_la = torch.nan_to_num(1.0 / kl_inverse(new_la, reference=True), posinf=0.0)
            new_lb = torch.nan_to_num(1.0 / kl_inverse(new_lb, reference=True), posinf=0.0)
        la = new_la if left else la
        lb = new_lb if right else lb
        if t % freq == 0:
            new_a, order_a = refresh(sa, qa) if left else (qa, torch.arange(m_rows))
            new_b, order_b = refresh(sb, qb) if right else (qb, torch.arange(n_cols))
            v = v[order_a, :][:, order_b]
            la, lb = la[order_a], lb[order_b]
            if adam is not None:
                mom = new_a.T @ (qa @ mom @ qb.T) @ new_b
            qa, qb = new_a, new_b
        out.append(w)
    return out


def ec_shampoo_distributed(w: Tensor, grad_fn: GradFn, steps: int, lr: float, b1: float, b2: float,
                           eps: float, wd: float, freq: int) -> list[Tensor]:
    """Eigenvalue-corrected Shampoo as distributed_shampoo computes it (the "Purifying Shampoo"
    equations, no grafting): per step t, factors EMA(b2); at t = freq and every freq steps the
    eigenvectors of L / (1 - b2^t), R / ... (identity before); then D = EMA((Q_L^T G Q_R)^2; b2)
    in that basis; P = Q_L [ (Q_L^T M_hat Q_R) / (sqrt(D / (1 - b2^t)) + eps) ] Q_R^T;
    W <- W - lr (P + wd W)."""
    rows, cols = w.shape
    left = torch.zeros(rows, rows, dtype=w.dtype)
    right = torch.zeros(cols, cols, dtype=w.dtype)
    ql, qr = _eye(rows, w), _eye(cols, w)
    m = torch.zeros_like(w)
    d = torch.zeros_like(w)
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(w)
        left = b2 * left + (1 - b2) * g @ g.T
        right = b2 * right + (1 - b2) * g.T @ g
        bc2 = 1 - b2**t
        if t % freq == 0:
            ql, qr = eigh_desc(left / bc2)[1], eigh_desc(right / bc2)[1]
        d = b2 * d + (1 - b2) * (ql.T @ g @ qr) ** 2
        m = b1 * m + (1 - b1) * g
        m_hat = m / (1 - b1**t)
        p = ql @ ((ql.T @ m_hat @ qr) / ((d / bc2).sqrt() + eps)) @ qr.T
        w = w - lr * (p + wd * w)
        out.append(w)
    return out


def shampoo_distributed(w: Tensor, grad_fn: GradFn, steps: int, lr: float, b1: float, b2: float,
                        eps: float, wd: float, freq: int, start: int, graft_b2: float = 0.999,
                        graft_eps: float = 1e-8, momentum: float = 0.0, nesterov: bool = False) -> list[Tensor]:
    """Shampoo with Adam grafting as distributed_shampoo computes it: factors EMA(b2) (summed
    when b2 = 1), roots of (L / (1 - b2^t) + eps I)^{-1/4} at t = start and at the multiples of
    freq after it; M_hat = EMA(G; b1) / (1 - b1^t); graft A = M_hat / (sqrt(V / (1 - gb2^t)) + geps)
    with V = EMA(G^2; gb2); P = A before start, else ||A|| / (||S|| + 1e-16) S with
    S = L^{-1/4} M_hat R^{-1/4}; P += wd W; heavy-ball momentum on P; W <- W - lr P."""
    rows, cols = w.shape
    left = torch.zeros(rows, rows, dtype=w.dtype)
    right = torch.zeros(cols, cols, dtype=w.dtype)
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    buf = torch.zeros_like(w)
    root_l = root_r = None
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(w)
        left = b2 * left + (1 - b2) * g @ g.T if b2 < 1 else left + g @ g.T
        right = b2 * right + (1 - b2) * g.T @ g if b2 < 1 else right + g.T @ g
        v = graft_b2 * v + (1 - graft_b2) * g * g
        bc2 = 1 - b2**t if b2 < 1 else 1.0
        if t == start or (t > start and t % freq == 0):
            root_l = matrix_power_sym(left / bc2, -0.25, eps)
            root_r = matrix_power_sym(right / bc2, -0.25, eps)
        m = b1 * m + (1 - b1) * g
        m_hat = m / (1 - b1**t)
        graft = m_hat / ((v / (1 - graft_b2**t)).sqrt() + graft_eps)
        if t < start:
            p = graft
        else:
            s = root_l @ m_hat @ root_r
            p = torch.linalg.norm(graft) / (torch.linalg.norm(s) + 1e-16) * s
        p = p + wd * w
        if momentum > 0:
            buf = momentum * buf + p
            p = p + momentum * buf if nesterov else buf
        w = w - lr * p
        out.append(w)
    return out


def eigenvalue_corrected_shampoo(w: Tensor, grad_fn: GradFn, steps: int, lr: float, b1: float,
                                 b2: float, bs: float, eps: float, wd: float, freq: int,
                                 identity: tuple[str, ...] = ()) -> list[Tensor]:
    g = grad_fn(w)
    left, right = (1 - bs) * g @ g.T, (1 - bs) * g.T @ g

    def bases() -> tuple[Tensor, Tensor]:
        return (_eye(w.shape[0], w) if "left" in identity else eigh_desc(left)[1],
                _eye(w.shape[1], w) if "right" in identity else eigh_desc(right)[1])

    ql, qr = bases()
    m = torch.zeros_like(w)
    d = torch.zeros_like(w)
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(w)
        m = b1 * m + (1 - b1) * g
        d = b2 * d + (1 - b2) * (ql.T @ g @ qr) ** 2
        m_hat = m / (1 - b1**t)
        d_hat = d / (1 - b2**t)
        w = (1 - lr * wd) * w - lr * (ql @ ((ql.T @ m_hat @ qr) / (d_hat + eps).sqrt()) @ qr.T)
        left = bs * left + (1 - bs) * g @ g.T
        right = bs * right + (1 - bs) * g.T @ g
        if t % freq == 0:
            ql, qr = bases()
        out.append(w)
    return out


def shampoo(w: Tensor, grad_fn: GradFn, steps: int, lr: float, b2: float, eps: float,
            exponent: float, freq: int, start: int, identity: tuple[str, ...] = ()) -> list[Tensor]:
    """Plain Shampoo (no momentum, no grafting): W -= lr (L+eps)^-p G (R+eps)^-p; an identity
    side's root is I (not (1 + eps)^-p)."""
    left = torch.zeros(w.shape[0], w.shape[0], dtype=w.dtype)
    right = torch.zeros(w.shape[1], w.shape[1], dtype=w.dtype)
    root_l = root_r = None
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(w)
        left = b2 * left + (1 - b2) * g @ g.T if b2 < 1 else left + g @ g.T
        right = b2 * right + (1 - b2) * g.T @ g if b2 < 1 else right + g.T @ g
        if t >= start and (t - start) % freq == 0:
            root_l = _eye(w.shape[0], w) if "left" in identity else matrix_power_sym(left, -exponent, eps)
            root_r = _eye(w.shape[1], w) if "right" in identity else matrix_power_sym(right, -exponent, eps)
        w = w - lr * (root_l @ g @ root_r if t >= start else g)
        out.append(w)
    return out


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: Tensor, steps: int = 5) -> Tensor:
    """Muon's quintic Newton-Schulz iteration (approximately U V^T of x = U S V^T)."""
    a, b, c = NS_COEFFICIENTS
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (torch.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def muon_scale(rows: int, cols: int, update_scale: str) -> float:
    if update_scale == "rms":
        return 0.2 * max(rows, cols) ** 0.5
    if update_scale == "shape":
        return max(1.0, rows / cols) ** 0.5
    raise ValueError(f"unknown update_scale {update_scale!r}")


def muon(w: Tensor, grad_fn: GradFn, steps: int, lr: float, momentum: float = 0.95,
         nesterov: bool = True, wd: float = 0.01, ns_steps: int = 5, update_scale: str = "rms",
         max_dim: int | None = None) -> list[Tensor]:
    """Muon on one matrix: returns W after each step.

    With ``max_dim`` the matrix is cut row-major into blocks of at most ``max_dim`` x
    ``max_dim`` and each block is orthogonalized, and scaled by its own shape, on its own
    (the momentum buffer is elementwise, so blocking changes nothing else).
    The buffer is an EMA, B <- mu B + (1 - mu) G; algorithms.md's B <- mu B + G differs by
    the factor 1 / (1 - mu) only, which the normalization removes up to its 1e-7.
    """
    rows, cols = w.shape
    size = max_dim or max(rows, cols)
    buf = torch.zeros_like(w)
    out = []
    for _ in range(steps):
        g = grad_fn(w)
        buf = momentum * buf + (1 - momentum) * g
        x = (1 - momentum) * g + momentum * buf if nesterov else buf
        update = torch.empty_like(w)
        for r in range(0, rows, size):
            for c in range(0, cols, size):
                block = x[r:r + size, c:c + size]
                scale = muon_scale(block.shape[0], block.shape[1], update_scale)
                update[r:r + size, c:c + size] = scale * newton_schulz(block, ns_steps)
        w = w * (1 - lr * wd) - lr * update
        out.append(w)
    return out


def asgo(w: Tensor, grad_fn: GradFn, steps: int, lr: float, b1: float, b2: float, eps: float, wd: float,
         freq: int, start: int = 1, side: str = "smaller", eigenvalues: str = "refresh") -> list[Tensor]:
    """ASGO / one-sided Shampoo on the ``side`` of W ("smaller": rows unless W is taller than
    wide): V = EMA(G G^T) (or G^T G), (lambda, Q) = eigh(V_hat) every ``freq`` steps from
    ``start``; U = P M_hat (or M_hat P) with P = Q diag(1 / (sqrt(d) + eps)) Q^T, where d is
    the refresh's lambda (``eigenvalues="refresh"``: P = (V_hat^{1/2} + eps I)^{-1} of the last
    refresh) or ``diag(Q^T V_hat_t Q)`` with this step's V_hat (``"current"``)."""
    rows, cols = w.shape
    left = side == "left" or (side == "smaller" and rows <= cols)
    d = rows if left else cols
    v = torch.zeros(d, d, dtype=w.dtype)
    m = torch.zeros_like(w)
    weight = 0.0
    values = basis = None
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(w)
        outer = g @ g.T if left else g.T @ g
        v = v + outer if b2 == 1.0 else b2 * v + (1 - b2) * outer
        weight = 1.0 if b2 == 1.0 else b2 * weight + (1 - b2)
        if t >= start and (t - start) % freq == 0:
            values, basis = torch.linalg.eigh(v / weight)
        m = b1 * m + (1 - b1) * g
        m_hat = m / (1 - b1**t)
        if t < start:
            u = m_hat
        else:
            scale = torch.diagonal(basis.T @ (v / weight) @ basis) if eigenvalues == "current" else values
            root = basis @ torch.diag(1.0 / (scale.clamp_min(0).sqrt() + eps)) @ basis.T
            u = root @ m_hat if left else m_hat @ root
        w = (1 - lr * wd) * w - lr * u
        out.append(w)
    return out
