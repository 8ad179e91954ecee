"""``tleg``: TLEG-style linear expansion (Xia et al., AAAI 2024) from the same template bank as WAVE.

TLEG stores two "learngene" layers and builds layer ``l`` of a depth-``L`` model as
``W_l = W_A + (l / L) W_B`` (``l = 0 .. L-1``; docs/wave.md sections 3 and 6). Here ``W_A, W_B`` are the
least-squares linear-in-depth fit of the auxiliary model's per-layer tensors (every matrix, bias and
LayerNorm, at the auxiliary layers' positions ``l / L_aux``), so TLEG and WAVE start from the same
distilled knowledge and differ only in how depth is expanded: a straight line for TLEG, per-layer scalers
for WAVE. Tensors outside the layers (patch and position embeddings, CLS, final LayerNorm) are copied.

Width: TLEG has no width rule; it is defined at the template width (``r = 1``), where the auxiliary model
at ``r = 1`` (``Scalers.from_source`` crops every scaler to 1 x 1) is the source. For other widths,
``width_expansion="wave"`` (default) takes the auxiliary model at the target width through WAVE's default,
unfitted scalers (crop or pad, as ``WaveInitializer.build``) and fits the line there;
``width_expansion="none"`` raises instead (the strict r = 1 baseline).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import ViTForImageClassification

from .. import vit_layout
from ..rule import assemble
from ..scalers import Scalers
from .common import model_from_encoder, target_config
from .registry import InitRequest, register_init_method

WIDTH_EXPANSIONS = ("wave", "none")


def linear_fit(stack: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares ``(A, B)`` with ``stack[l] ~ A + (l / L) B`` over ``l = 0 .. L-1`` (float64 inside).

    One layer has no slope: ``B = 0`` and ``A`` is that layer.
    """
    depth = stack.shape[0]
    w = stack.double()
    if depth == 1:
        return w[0].to(stack.dtype), torch.zeros_like(stack[0])
    u = torch.arange(depth, dtype=torch.float64) / depth
    uc = u - u.mean()
    shape = (depth,) + (1,) * (stack.dim() - 1)
    slope = (uc.reshape(shape) * (w - w.mean(0))).sum(0) / uc.pow(2).sum()
    base = w.mean(0) - slope * u.mean()
    return base.to(stack.dtype), slope.to(stack.dtype)


def learngene(initializer: Any, width: int, num_heads: int | None = None, seed: int = 0,
              width_expansion: str = "wave", image_size: int | None = None
              ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """``({per-layer name: (A, B)}, {global key: tensor})`` from the bank's auxiliary model at ``width`` (and
    ``image_size``, default the bank's: the position embeddings are resampled as ``WaveInitializer.build`` does)."""
    if width_expansion not in WIDTH_EXPANSIONS:
        raise ValueError(f"width_expansion must be one of {list(WIDTH_EXPANSIONS)}, got {width_expansion!r}")
    config = initializer.config
    if width_expansion == "none" and width != config.template_width:
        raise ValueError(
            f"TLEG is defined at the template width only (r = 1): width={width}, template_width="
            f"{config.template_width}; pass width_expansion='wave' to expand other widths by WAVE's default scalers"
        )
    source = Scalers.from_source(config, initializer.bank.aux, config.aux_depth, width, num_heads, seed=seed)
    state = assemble(initializer.config_at(image_size), initializer.bank.templates, source)
    layers = {}
    for name in vit_layout.layer_tensor_names():
        keys = [vit_layout.layer_key(layer, name) for layer in range(config.aux_depth)]
        if keys[0] in state:  # q/k/v biases only exist with qkv_bias
            layers[name] = linear_fit(torch.stack([state[k] for k in keys]))
    globals_ = {vit_layout.global_key(n): state[vit_layout.global_key(n)] for n in vit_layout.GLOBAL_TENSORS}
    return layers, globals_


@register_init_method("tleg", needs=("initializer",), options=("width_expansion",),
                      description="linear-depth (TLEG-style): W_l = W_A + (l/L) W_B least-squares fitted to the bank's "
                                  "auxiliary model; not TLEG's trained learngene")
def tleg(req: InitRequest) -> ViTForImageClassification:
    """Any depth (the line is only sampled at ``l / L``, never extrapolated past the auxiliary range)."""
    config = target_config(req.depth, req.width, num_heads=req.num_heads, num_labels=req.num_labels,
                           id2label=req.id2label, initializer=req.initializer, image_size=req.image_size)
    depth = config.num_hidden_layers
    layers, state = learngene(req.initializer, config.hidden_size, config.num_attention_heads, req.seed,
                              req.options.get("width_expansion", "wave"), config.image_size)
    for layer in range(depth):
        for name, (base, slope) in layers.items():
            state[vit_layout.layer_key(layer, name)] = base + (layer / depth) * slope
    return model_from_encoder(config, state, req.seed)
