"""Fold a trained SuperNet into ONE stock ViT encoder of the original size plus one head per task.

Exact (no approximation): between a U and its M there are only per-model linear maps, and everything
between an M and the next U acts on the merged stream with no per-model parameters. Computed in float64
and stored in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import vit_layout as L
from .merged import MergedViT

if TYPE_CHECKING:  # fold reads a SuperNet; the SuperNet calls fold (one direction at run time)
    from .supernet import SuperNet


def _fold_linear(w: torch.Tensor, b: torch.Tensor, u, m) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, out, in), b (N, out) -> W* = sum_i M_i.T W_i U_i.T (out, in), b* = sum_i b_i M_i."""
    ws, bs = 0, 0
    for i in range(w.shape[0]):
        mi, ui = m.block(i).double(), u.block(i).double()
        ws = ws + mi.T @ w[i].double() @ ui.T
        bs = bs + b[i].double() @ mi
    return ws.float(), bs.float()


@torch.no_grad()
def fold_supernet(net: SuperNet) -> MergedViT:
    cfg, n, d = net.config, net.n, net.config.hidden_size
    state: dict[str, torch.Tensor] = {}
    m_pre = [net.m_pre.block(i).double() for i in range(n)]
    patch_w = net.patch_w.double().unflatten(0, (n, d))  # (N, d, C, p, p)
    patch_b = net.patch_b.double().view(n, d)
    state[L.global_key("patch_weight")] = sum(
        (m_pre[i].T @ patch_w[i].flatten(1)) for i in range(n)).view_as(patch_w[0]).float()
    state[L.global_key("patch_bias")] = sum(patch_b[i] @ m_pre[i] for i in range(n)).float()
    state[L.global_key("cls")] = sum(net.cls[i].double() @ m_pre[i] for i in range(n)).view(1, 1, d).float()
    state[L.global_key("pos")] = sum(net.pos[:, i].double() @ m_pre[i] for i in range(n)).unsqueeze(0).float()
    state[L.global_key("final_ln_weight")] = net.final_ln.weight.detach().clone()
    state[L.global_key("final_ln_bias")] = net.final_ln.bias.detach().clone()
    for layer, block in enumerate(net.blocks):
        for name, (u, m) in block.maps().items():
            w, b = _fold_linear(getattr(block, f"w_{name}"), getattr(block, f"b_{name}"), u, m)
            state[L.layer_key(layer, name)] = w
            state[L.layer_key(layer, f"{name}_bias")] = b
        for short, ln in (("ln1", block.ln1), ("ln2", block.ln2)):
            state[L.layer_key(layer, f"{short}_weight")] = ln.weight.detach().clone()
            state[L.layer_key(layer, f"{short}_bias")] = ln.bias.detach().clone()
    heads = {}
    for i, task in enumerate(net.tasks):
        hw, hb = net.head(i)
        # head_i* = W_head_i . U_task^(i).T  (row convention: logits = f* @ U_i @ W_head_i.T + b)
        heads[task] = ((hw.double() @ net.u_task.block(i).double().T).float(), hb.detach().clone())
    return MergedViT(
        config=cfg,
        encoder_state=state,
        heads=heads,
        id2label={t: net.id2labels[i] for i, t in enumerate(net.tasks)},
        sources=list(net.sources),
    )
