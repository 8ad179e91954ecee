"""The Kronecker rule ``W = sum_t T_t kron S_t`` and its inverse, as pure functions.

Layout (docs/wave.md section 2): template unit ``a`` becomes target units ``a*r .. a*r+r-1``, so
``W[a*r+p, b*r+q] = sum_t T[t, a, b] * S[t, p, q]``. Slicing the fused qkv template by rows before the
product keeps q, k and v in their own regions, and heads stay whole.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import torch
from torch import Tensor


def kron_matrix(templates: Tensor, scalers: Tensor) -> Tensor:
    """Matrices from templates ``(N, A, B)`` and scalers ``(..., N, r, r)``: returns ``(..., A*r, B*r)``."""
    n, a, b = templates.shape
    *batch, n_s, r1, r2 = scalers.shape
    if n_s != n:
        raise ValueError(f"scalers hold {n_s} templates' coefficients, the bank has {n}")
    out = torch.einsum("tab,...tpq->...apbq", templates, scalers)
    return out.reshape(*batch, a * r1, b * r2)


def kron_vector(templates: Tensor, scalers: Tensor) -> Tensor:
    """Unit-axis tensors from templates ``(..., J, E, A)`` and scalers ``(..., J, r)``: ``(..., E, A*r)``.

    ``E`` is any extra axis that is not a unit of the residual stream (patch pixels, token positions).
    """
    *batch, j, e, a = templates.shape
    r = scalers.shape[-1]
    if scalers.shape[-2] != j:
        raise ValueError(f"vector scalers hold {scalers.shape[-2]} coefficients, templates {j}")
    out = torch.einsum("...jea,...jp->...eap", templates, scalers)
    return out.reshape(*batch, e, a * r)


def nearest_kronecker(weights: Tensor, num_templates: int, ratio: int) -> tuple[Tensor, Tensor]:
    """Best shared templates for a stack of layer matrices (Van Loan & Pitsianis, rank-N SVD).

    ``weights`` is ``(L, A*r, B*r)``. Rearranging each matrix to ``R_l[(a,b), (p,q)] = W_l[a*r+p, b*r+q]``
    turns ``sum_t T_t kron S_{l,t}`` into a rank-N product ``[R_1 .. R_L] = sum_t vec(T_t) vec(S_{.,t})^T``,
    so a truncated SVD gives the least-squares optimum with templates shared across layers. Returns
    templates ``(N, A, B)`` and scalers ``(L, N, r, r)``; singular values are split evenly by rms.
    """
    depth, rows, cols = weights.shape
    if rows % ratio or cols % ratio:
        raise ValueError(f"matrix shape {(rows, cols)} is not divisible by ratio {ratio}")
    a, b = rows // ratio, cols // ratio
    r = weights.reshape(depth, a, ratio, b, ratio).permute(1, 3, 0, 2, 4).reshape(a * b, depth * ratio * ratio)
    u, s, vh = torch.linalg.svd(r.double(), full_matrices=False)
    k = min(num_templates, s.numel())
    # Split each singular value so that template and scaler entries have comparable rms.
    t_rms = (a * b) ** 0.5
    s_rms = (depth * ratio * ratio) ** 0.5
    left = (s[:k] * s_rms / t_rms).sqrt()
    right = s[:k] / left
    templates = (u[:, :k] * left).T.reshape(k, a, b)
    scalers = (right[:, None] * vh[:k]).reshape(k, depth, ratio, ratio).permute(1, 0, 2, 3)
    if k < num_templates:
        templates = torch.cat([templates, templates.new_zeros(num_templates - k, a, b)])
        scalers = torch.cat([scalers, scalers.new_zeros(depth, num_templates - k, ratio, ratio)], dim=1)
    return templates.to(weights.dtype).contiguous(), scalers.to(weights.dtype).contiguous()


def nearest_kronecker_vector(tensor: Tensor, num_templates: int, ratio: int) -> tuple[Tensor, Tensor]:
    """Inverse of ``kron_vector`` for ``(..., E, A*r)``: templates ``(..., J, E, A)``, scalers ``(..., J, r)``.

    Exact when ``num_templates >= ratio``.
    """
    *batch, e, ar = tensor.shape
    a = ar // ratio
    flat = tensor.reshape(-1, e, a, ratio).reshape(-1, e * a, ratio).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = min(num_templates, s.shape[-1])
    root = s[..., :k].sqrt()
    templates = (u[..., :k] * root[..., None, :]).transpose(-1, -2).reshape(*batch, k, e, a)
    scalers = (root[..., :, None] * vh[..., :k, :]).reshape(*batch, k, ratio)
    if k < num_templates:
        templates = torch.cat([templates, templates.new_zeros(*batch, num_templates - k, e, a)], dim=-3)
        scalers = torch.cat([scalers, scalers.new_zeros(*batch, num_templates - k, ratio)], dim=-2)
    return templates.to(tensor.dtype).contiguous(), scalers.to(tensor.dtype).contiguous()


@functools.lru_cache(maxsize=256)
def _depth_plan(src: int, depth: int) -> tuple[tuple[int, float, float] | int, ...]:
    """Per target layer: the source layer it copies (an ``int``), or ``(lo, 1 - w, w)`` to blend ``lo, lo+1``.

    Exact rational arithmetic, computed once per ``(src, depth)`` (the rule runs on every ``build``)."""
    plan: list[tuple[int, float, float] | int] = []
    for layer in range(depth):
        pos = Fraction(2 * layer + 1, 2 * depth) * src - Fraction(1, 2)
        pos = min(max(pos, Fraction(0)), Fraction(src - 1))
        lo = int(pos)
        w = pos - lo
        plan.append(lo if w == 0 else (lo, float(1 - w), float(w)))
    return tuple(plan)


def interpolate_depth(per_layer: Tensor, depth: int) -> Tensor:
    """Resample a per-layer stack ``(L_src, ...)`` to ``depth`` layers by relative depth ``(l + 1/2) / L``.

    Exact rational arithmetic, so ``depth == L_src`` returns the input bit for bit.
    """
    plan = _depth_plan(per_layer.shape[0], depth)
    if all(isinstance(step, int) for step in plan):  # pure copies (e.g. the same depth): one gather
        return per_layer[torch.tensor(plan, dtype=torch.long)]
    rows = [per_layer[step] if isinstance(step, int)
            else per_layer[step[0]] * step[1] + per_layer[step[0] + 1] * step[2] for step in plan]
    return torch.stack(rows)


def resize_ratio(scalers: Tensor, ratio: int, dims: int, generator: torch.Generator | None = None) -> Tensor:
    """Crop or pad the last ``dims`` axes of scalers to ``ratio``.

    Cropping keeps the first ``r`` sibling units, so the target is an exact unit selection of the source.
    Padding adds i.i.d. ``N(0, rms^2)`` entries: new siblings must differ from the old ones, or they would
    stay copies forever (docs/wave.md section 8).
    """
    out = scalers
    for axis in range(scalers.dim() - dims, scalers.dim()):
        size = out.shape[axis]
        if ratio <= size:
            out = out.narrow(axis, 0, ratio)
            continue
        pad_shape = list(out.shape)
        pad_shape[axis] = ratio - size
        rms = out.pow(2).mean().sqrt().item() or 1.0
        pad = torch.randn(pad_shape, generator=generator, dtype=out.dtype) * rms
        out = torch.cat([out, pad], dim=axis)
    return out.contiguous()


def random_orthogonal(rows: int, cols: int, generator: torch.Generator | None = None) -> Tensor:
    """A ``rows x cols`` slice of a Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    n = max(rows, cols)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q[:rows, :cols].float()
