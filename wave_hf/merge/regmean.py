"""RegMean (Jin et al., 2023): each linear layer (and the patch conv, as a linear over patches) gets the
closed form  W* = (sum_i W_i G_i)(sum_i G_i)^-1  from the Gram matrices G_i = X_i^T X_i of model i's inputs
to that layer on task i's merge images; off-diagonals of each G_i are scaled by ``alpha`` (0.7). Every other
tensor (biases, LayerNorms, cls, pos) is averaged. No alignment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .. import vit_layout as L
from .common import MergeData, average_states, encoder_state
from .merged import from_encoder
from .registry import MergeMethod, register_merge_method


@torch.no_grad()
def gram_matrices(model, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Input Gram matrix of every linear of the encoder (and the patch conv), by weight key, float64."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    cfg = model.config

    def add(key, x):
        x = x.reshape(-1, x.shape[-1]).double()
        grams[key] = grams.get(key, 0) + x.T @ x

    for layer, block in enumerate(L.encoder_layers(model)):
        for name, path in L.LAYER_LINEARS.items():
            key = L.layer_key(layer, name)
            mod = L.submodule(block, path)
            hooks.append(mod.register_forward_hook(lambda m, inp, out, key=key: add(key, inp[0])))
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            add(L.global_key("patch_weight"),
                F.unfold(x, cfg.patch_size, stride=cfg.patch_size).transpose(1, 2))
            L.encoder(model)(pixel_values=x)
    finally:
        for h in hooks:
            h.remove()
    return grams


def regmean_weight(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """(sum W_i G~_i)(sum G~_i)^-1 with G~ = alpha G + (1-alpha) diag(G); a tiny ridge pulls directions
    no merge image excites towards the plain average."""
    shape = weights[0].shape
    ws = [w.reshape(shape[0], -1).double() for w in weights]
    gs = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    g_sum = sum(gs)
    eps = 1e-6 * torch.diag(g_sum).mean().clamp_min(1e-12)
    eye = torch.eye(g_sum.shape[0], dtype=g_sum.dtype)
    rhs = sum(g @ w.T for g, w in zip(gs, ws)) + eps * sum(w.T for w in ws) / len(ws)
    return torch.linalg.solve(g_sum + eps * eye, rhs).T.reshape(shape).float()


@register_merge_method("regmean")
@dataclass
class RegMean(MergeMethod):
    alpha: float = 0.7

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def run(self, models, tasks, data: MergeData):
        images = data.all_images()
        grams = [gram_matrices(m, x) for m, x in zip(models, images)]
        states = [encoder_state(m) for m in models]
        merged = average_states(states)
        for key in grams[0]:
            merged[key] = regmean_weight([s[key] for s in states], [g[key] for g in grams], self.alpha)
        return from_encoder(models, tasks, merged)
