"""Fold a SuperNet into ONE stock ViT encoder of the original size plus one head per task.

Exact (no approximation): between a U and its M there are only per-model linear maps, and everything
between an M and the next U acts on the merged stream with no per-model parameters. ``folded_encoder`` is
differentiable: the SuperNet trains through it (one stock ViT forward on the folded weights instead of N
per-model streams, so a step costs about what a KD step costs and activation memory does not grow with N),
and ``fold_supernet`` evaluates it once in float64 for the stored float32 result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import vit_layout as L
from .merged import MergedViT

MapTensors = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # diag, a, b (see supernet.py)


def map_tensors(maps: Sequence[nn.Module], dtype: torch.dtype) -> MapTensors:
    """The factors of several ``supernet.MergeMap`` / ``UnmergeMap`` of one shape, stacked on a leading axis:
    ``(diag, a, b)`` (``a, b`` None at rank 0). Folding every block's maps of one kind in one batched product keeps a training step's op count
    independent of the depth."""
    diag = torch.stack([m.diag for m in maps]).to(dtype)
    if maps[0].a is None:
        return diag, None, None
    return diag, torch.stack([m.a for m in maps]).to(dtype), torch.stack([m.b for m in maps]).to(dtype)


def fold_linear(w: torch.Tensor, b: torch.Tensor | None, u: MapTensors | None, m: MapTensors
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w (..., N, out, in), b (..., N, out) -> ``W* = sum_i M_i.T W_i U_i.T`` (..., out, in) and
    ``b* = sum_i b_i M_i`` (..., out), for maps given by ``map_tensors`` with the same leading axes.

    ``u=None`` is the identity (the embeddings have no unmerge). Computed through the maps' factors (diagonal +
    rank r), never as dense (N*e x e) blocks: O(N * out * in * r).
    """
    *lead, n, out_dim, in_dim = w.shape
    m_diag, m_a, m_b = m
    p = w.transpose(-1, -2) * m_diag[..., :, None, :]  # P_i = W_i.T M_i: (..., N, in, out)
    a = None
    if m_a is not None:
        a = m_a.reshape(*lead, n, out_dim, -1)  # A_i: (..., N, out, r)
        p = p + torch.einsum("...noi,...nor->...nir", w, a) @ m_b.unsqueeze(-3)
    if u is None:
        k = p.sum(-3)
    else:
        u_diag, u_a, u_b = u
        k = (u_diag[..., :, :, None] * p).sum(-3)  # sum_i diag(E_i) P_i: (..., in, out)
        if u_a is not None:
            c = u_a.reshape(*lead, -1, n, in_dim)  # C_i: (..., r, N, in)
            k = k + u_b @ torch.einsum("...rni,...nio->...ro", c, p)
    if b is None:
        return k.transpose(-1, -2), None
    bias = (b * m_diag).sum(-2)
    if a is not None:
        bias = bias + (torch.einsum("...no,...nor->...r", b, a).unsqueeze(-2) @ m_b).squeeze(-2)
    return k.transpose(-1, -2), bias


def folded_encoder(net: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A ``supernet.SuperNet`` as the state of one stock ViT encoder (``vit.``-prefixed keys), in ``dtype``."""
    n, d = net.n, net.config.hidden_size
    state: dict[str, torch.Tensor] = {}
    pre = map_tensors([net.m_pre], dtype)
    patch_w = net.patch_w.to(dtype).unflatten(0, (n, d))  # (N, d, C, p, p)
    w, bias = fold_linear(patch_w.flatten(2)[None], net.patch_b.to(dtype).view(1, n, d), None, pre)
    state[L.global_key("patch_weight")] = w[0].view_as(patch_w[0])
    state[L.global_key("patch_bias")] = bias[0]
    # cls (N, d) and pos (T, N, d) are per-model row vectors: fold them as one "linear" with 1 (or T) inputs.
    cls, _ = fold_linear(net.cls.to(dtype)[None, :, :, None], None, None, pre)
    state[L.global_key("cls")] = cls.reshape(1, 1, d)
    pos, _ = fold_linear(net.pos.to(dtype).permute(1, 2, 0)[None], None, None, pre)
    state[L.global_key("pos")] = pos[0].T.unsqueeze(0)
    state[L.global_key("final_ln_weight")] = net.final_ln.weight.to(dtype)
    state[L.global_key("final_ln_bias")] = net.final_ln.bias.to(dtype)
    blocks = list(net.blocks)
    block_maps = [block.maps() for block in blocks]
    for name in L.LAYER_LINEARS:  # one batched fold per kind of linear, over every block
        pairs = [maps[name] for maps in block_maps]
        w = torch.stack([getattr(block, f"w_{name}") for block in blocks]).to(dtype)  # (L, N, out, in)
        b = torch.stack([getattr(block, f"b_{name}") for block in blocks]).to(dtype)
        w, bias = fold_linear(w, b, map_tensors([u for u, _ in pairs], dtype), map_tensors([m for _, m in pairs], dtype))
        for layer in range(len(blocks)):
            state[L.layer_key(layer, name)] = w[layer]
            state[L.layer_key(layer, f"{name}_bias")] = bias[layer]
    for layer, block in enumerate(blocks):
        for short, ln in (("ln1", block.ln1), ("ln2", block.ln2)):
            state[L.layer_key(layer, f"{short}_weight")] = ln.weight.to(dtype)
            state[L.layer_key(layer, f"{short}_bias")] = ln.bias.to(dtype)
    return state


@torch.no_grad()
def fold_supernet(net: nn.Module) -> MergedViT:
    """A trained ``supernet.SuperNet`` as one stock encoder + one head per task (the supernet imports this module:
    it is typed by duck, not by import)."""
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
