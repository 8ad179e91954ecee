"""The assembly rule: (bank templates, size-specific ``Scalers``) -> every encoder tensor of a stock ViT.

A matrix is ``sum_t T_t kron S_{l,t}``, plus ``A_l @ B_l`` when the scalers carry a low-rank correction.

Each tensor has its own small function so that a parametrized model recomputes only what it reads, and
``assemble`` is nothing more than all of them in key order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from . import vit_layout
from .configuration_wave import WaveTemplateConfig
from .kronecker import kron_matrix, kron_vector
from .scalers import Scalers, vector_kinds

TensorRule = Callable[[Mapping[str, Tensor], Scalers], Tensor]

_QKV_ROWS = {"q": 0, "k": 1, "v": 2}
_MATRIX_SOURCE = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "fc1": "fc1", "fc2": "fc2"}


def _matrix_rule(name: str, layer: int, a: int) -> TensorRule:
    kind = _MATRIX_SOURCE[name]

    def rule(templates: Mapping[str, Tensor], scalers: Scalers) -> Tensor:
        t = templates[kind]
        if name in _QKV_ROWS:  # slice q/k/v before the product: heads and regions stay whole
            t = t[:, _QKV_ROWS[name] * a : (_QKV_ROWS[name] + 1) * a]
        weight = kron_matrix(t, scalers.matrix[kind][layer])
        if scalers.lowrank_rank:  # the per-size correction A_l @ B_l (rank 0: no op at all, today's bits)
            weight = weight + scalers.lowrank_a[name][layer] @ scalers.lowrank_b[name][layer]
        return weight

    return rule


def _vector_rule(name: str, layer: int | None, shape: tuple[int, ...], transpose: bool) -> TensorRule:
    def rule(templates: Mapping[str, Tensor], scalers: Scalers) -> Tensor:
        t, s = scalers.vectors[name], scalers.vector_scalers[name]
        if layer is not None:
            t, s = t[layer], s[layer]
        out = kron_vector(t, s)  # (E, units)
        if transpose:
            out = out.T
        return out.reshape(shape)

    return rule


def _position_rule(config: WaveTemplateConfig, width: int) -> TensorRule:
    """Position embeddings at ``config.image_size``. Scalers always hold the position templates of the grid
    the bank was distilled at; a config for another image size (``WaveInitializer`` at ``image_size=``)
    gets them resampled exactly as the teacher family resamples (``vit_layout.resample_positions``). The
    resample acts on the token axis and the Kronecker sum on the unit axis, so resampling the built
    embeddings equals building from resampled templates; it is differentiable, so a fit trains through it."""
    base = _vector_rule("pos", None, (-1, width), False)

    def rule(templates: Mapping[str, Tensor], scalers: Scalers) -> Tensor:
        pos = base(templates, scalers)[None]
        if pos.shape[1] != config.num_tokens:
            pos = vit_layout.resample_positions(pos, config.image_size, config.patch_size)
        return pos

    return rule


def tensor_rules(config: WaveTemplateConfig, depth: int, width: int) -> dict[str, TensorRule]:
    """One rule per encoder key of a ``ViTForImageClassification`` of this size, in state-dict order."""
    a = config.template_width
    c, p = config.num_channels, config.patch_size
    rules: dict[str, TensorRule] = {}
    kinds = vector_kinds(config)
    global_shapes = {
        "patch_weight": ((width, c, p, p), True),
        "patch_bias": ((width,), False),
        "cls": ((1, 1, width), False),
        "final_ln_weight": ((width,), False),
        "final_ln_bias": ((width,), False),
    }
    for name in vit_layout.GLOBAL_TENSORS:  # the ViT's key order
        rules[vit_layout.global_key(name)] = (_position_rule(config, width) if name == "pos"
                                              else _vector_rule(name, None, *global_shapes[name]))
    for layer in range(depth):
        for name in vit_layout.LAYER_MATRICES:
            rules[vit_layout.layer_key(layer, name)] = _matrix_rule(name, layer, a)
        for name in vit_layout.LAYER_VECTORS:
            if name in kinds:
                units = width * kinds[name].unit_multiple
                rules[vit_layout.layer_key(layer, name)] = _vector_rule(name, layer, (units,), False)
    return rules


def assemble(config: WaveTemplateConfig, templates: Mapping[str, Tensor], scalers: Scalers) -> dict[str, Tensor]:
    """Every encoder tensor of the target described by ``scalers`` (classifier excluded)."""
    rules = tensor_rules(config, scalers.depth, scalers.width)
    return {key: rule(templates, scalers) for key, rule in rules.items()}
