"""Fold a SuperNet into ONE stock ViT encoder of the original size plus one head per task.

Exact (no approximation): between a U and its M there are only per-model linear maps, and everything
between an M and the next U acts on the merged stream with no per-model parameters. ``folded_encoder`` is
differentiable: the SuperNet trains through it (one stock ViT forward on the folded weights instead of N
per-model streams, so a step costs about what a KD step costs and activation memory does not grow with N),
and ``fold_supernet`` evaluates it once in float64 for the stored float32 result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import vit_layout as L
from .merged import MergedViT

if TYPE_CHECKING:  # fold reads a SuperNet; the SuperNet imports fold (one direction at run time)
    from .supernet import MergeMap, SuperNet, UnmergeMap


def fold_linear(w: torch.Tensor, b: torch.Tensor | None, u: UnmergeMap | None, m: MergeMap
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w (N, out, in), b (N, out) -> ``W* = sum_i M_i.T W_i U_i.T`` (out, in), ``b* = sum_i b_i M_i`` (out).

    ``u=None`` is the identity (the embeddings have no unmerge). Computed in ``w``'s dtype through the maps'
    factors (diagonal + rank r), never as dense (N*e x e) blocks: O(N * out * in * r).
    """
    dtype, n, out_dim = w.dtype, w.shape[0], w.shape[1]
    cast = lambda t: t.to(dtype)  # noqa: E731
    p = w.transpose(1, 2) * cast(m.diag)[:, None, :]  # P_i = W_i.T M_i: (N, in, out)
    if m.a is not None:
        a = cast(m.a).view(n, out_dim, -1)  # A_i: (N, out, r)
        p = p + torch.einsum("noi,nor->nir", w, a) @ cast(m.b)
    if u is None:
        k = p.sum(0)
    else:
        k = (cast(u.diag)[:, :, None] * p).sum(0)  # sum_i diag(E_i) P_i: (in, out)
        if u.a is not None:
            c = cast(u.a).view(-1, n, w.shape[2])  # C_i: (r, N, in)
            k = k + cast(u.b) @ torch.einsum("rni,nio->ro", c, p)
    if b is None:
        return k.T, None
    bias = (b * cast(m.diag)).sum(0)
    if m.a is not None:
        bias = bias + torch.einsum("no,nor->r", b, a) @ cast(m.b)
    return k.T, bias


def folded_encoder(net: SuperNet, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The SuperNet as the state of one stock ViT encoder (``vit.``-prefixed keys), in ``dtype``."""
    n, d = net.n, net.config.hidden_size
    state: dict[str, torch.Tensor] = {}
    patch_w = net.patch_w.to(dtype).unflatten(0, (n, d))  # (N, d, C, p, p)
    w, bias = fold_linear(patch_w.flatten(2), net.patch_b.to(dtype).view(n, d), None, net.m_pre)
    state[L.global_key("patch_weight")] = w.view_as(patch_w[0])
    state[L.global_key("patch_bias")] = bias
    # cls (N, d) and pos (T, N, d) are per-model row vectors: fold them as one "linear" with T (or 1) rows.
    cls, _ = fold_linear(net.cls.to(dtype)[:, None, :].transpose(1, 2), None, None, net.m_pre)
    state[L.global_key("cls")] = cls.reshape(1, 1, d)
    pos, _ = fold_linear(net.pos.to(dtype).permute(1, 2, 0), None, None, net.m_pre)
    state[L.global_key("pos")] = pos.T.unsqueeze(0)
    state[L.global_key("final_ln_weight")] = net.final_ln.weight.to(dtype)
    state[L.global_key("final_ln_bias")] = net.final_ln.bias.to(dtype)
    for layer, block in enumerate(net.blocks):
        for name, (u, m) in block.maps().items():
            w, bias = fold_linear(getattr(block, f"w_{name}").to(dtype), getattr(block, f"b_{name}").to(dtype), u, m)
            state[L.layer_key(layer, name)] = w
            state[L.layer_key(layer, f"{name}_bias")] = bias
        for short, ln in (("ln1", block.ln1), ("ln2", block.ln2)):
            state[L.layer_key(layer, f"{short}_weight")] = ln.weight.to(dtype)
            state[L.layer_key(layer, f"{short}_bias")] = ln.bias.to(dtype)
    return state


@torch.no_grad()
def fold_supernet(net: SuperNet) -> MergedViT:
    state = {k: v.float().contiguous() for k, v in folded_encoder(net, torch.float64).items()}
    heads = {}
    for i, task in enumerate(net.tasks):
        hw, hb = net.head(i)
        # head_i* = W_head_i . U_task^(i).T  (row convention: logits = f* @ U_i @ W_head_i.T + b)
        heads[task] = ((hw.double() @ net.u_task.block(i).double().T).float(), hb.detach().clone())
    return MergedViT(
        config=net.config,
        encoder_state=state,
        heads=heads,
        id2label={t: net.id2labels[i] for i, t in enumerate(net.tasks)},
        sources=list(net.sources),
    )
