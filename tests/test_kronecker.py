"""The Kronecker rule against explicit loops, and its inverse."""

from __future__ import annotations

import pytest
import torch

from wave_hf.kronecker import (
    interpolate_depth,
    kron_matrix,
    kron_vector,
    nearest_kronecker,
    nearest_kronecker_vector,
    resize_ratio,
)


def reference_kron_matrix(templates: torch.Tensor, scalers: torch.Tensor) -> torch.Tensor:
    n, a, b = templates.shape
    r = scalers.shape[-1]
    out = torch.zeros(a * r, b * r, dtype=templates.dtype)
    for t in range(n):
        for i in range(a):
            for j in range(b):
                for p in range(r):
                    for q in range(r):
                        out[i * r + p, j * r + q] += templates[t, i, j] * scalers[t, p, q]
    return out


@pytest.mark.parametrize("n, a, b, r", [(1, 2, 3, 1), (3, 4, 2, 2), (2, 3, 5, 3)])
def test_kron_matrix_matches_loops(n, a, b, r):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, a, b, generator=g, dtype=torch.float64)
    s = torch.randn(n, r, r, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_matrix(t, s), reference_kron_matrix(t, s), rtol=0, atol=1e-12)
    # The library rule is the sum of torch.kron products (T kron S layout, not S kron T).
    torch.testing.assert_close(kron_matrix(t, s), sum(torch.kron(t[i], s[i]) for i in range(n)), rtol=0, atol=1e-12)


def test_ratio_one_is_weighted_sum():
    t = torch.randn(4, 6, 5)
    s = torch.randn(4, 1, 1)
    torch.testing.assert_close(kron_matrix(t, s), (s.view(4, 1, 1) * t).sum(0))


def test_kron_matrix_batched_over_layers():
    t = torch.randn(3, 4, 4)
    s = torch.randn(5, 3, 2, 2)
    batched = kron_matrix(t, s)
    assert batched.shape == (5, 8, 8)
    for layer in range(5):
        torch.testing.assert_close(batched[layer], kron_matrix(t, s[layer]))


def test_kron_vector_matches_loops():
    t = torch.randn(3, 2, 4)  # J, E, A
    s = torch.randn(3, 2)  # J, r
    out = kron_vector(t, s)
    for e in range(2):
        for a in range(4):
            for p in range(2):
                assert torch.isclose(out[e, a * 2 + p], (t[:, e, a] * s[:, p]).sum())


def test_nearest_kronecker_exact_at_full_rank():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)  # L=3, A=3, B=2 at r=2
    full = 3 * 2 * 2  # L * r * r columns in the rearranged matrix
    t, s = nearest_kronecker(w, full, 2)
    torch.testing.assert_close(kron_matrix(t, s), w, rtol=0, atol=1e-10)


def test_nearest_kronecker_is_best_rank_n():
    """More shared templates fit strictly better; rank A*B (here 16) is exact."""
    w = torch.randn(4, 12, 12, dtype=torch.float64)
    errs = [(kron_matrix(*nearest_kronecker(w, n, 3)) - w).norm() for n in (1, 4, 8, 16)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-9


def test_nearest_kronecker_vector_exact_when_enough_templates():
    v = torch.randn(5, 2, 12)
    t, s = nearest_kronecker_vector(v, 3, 3)
    torch.testing.assert_close(kron_vector(t, s), v, rtol=0, atol=1e-5)


def test_interpolate_depth_identity_and_midpoints():
    x = torch.randn(4, 3)
    assert torch.equal(interpolate_depth(x, 4), x)
    two = interpolate_depth(x, 2)  # relative depths 1/4, 3/4 -> source positions 0.5, 2.5
    torch.testing.assert_close(two[0], (x[0] + x[1]) / 2)
    torch.testing.assert_close(two[1], (x[2] + x[3]) / 2)


def test_resize_ratio_crop_and_pad():
    s = torch.randn(2, 3, 3, 3)
    assert torch.equal(resize_ratio(s, 2, 2), s[..., :2, :2])
    padded = resize_ratio(s, 5, 2, torch.Generator().manual_seed(0))
    assert padded.shape == (2, 3, 5, 5) and torch.equal(padded[..., :3, :3], s)
    assert padded[..., 3:, :].abs().sum() > 0
