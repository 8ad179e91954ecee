"""What the baselines share: the target ``ViTConfig`` and assembling a stock model. Teachers are loaded by
``wave_hf.teachers.load_teacher`` (ViT, DeiT, Dinov2; any image size), the loader stage 1 and 2 use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import ViTConfig, ViTForImageClassification

from .. import vit_layout
from ..fold import head_init_
from ..teachers import load_teacher


def config_like(source: ViTConfig, depth: int, width: int, num_heads: int | None = None, num_labels: int = 10,
                id2label: dict[int, str] | None = None) -> ViTConfig:
    """A stock config with ``source``'s geometry, norm eps and activation at a new size.

    The default head count keeps the source's head size (a 192-wide, 3-head teacher gives 64-wide heads).
    """
    shape = vit_layout.with_size(vit_layout.shape_of(source), depth, width, num_heads)
    config = vit_layout.make_vit_config(
        shape, layer_norm_eps=source.layer_norm_eps, qkv_bias=source.qkv_bias, hidden_act=source.hidden_act,
        num_labels=num_labels, id2label=id2label,
    )
    vit_layout.check_buildable(shape, config.num_labels)
    return config


def target_config(
    depth: int,
    width: int,
    *,
    num_heads: int | None,
    num_labels: int,
    id2label: dict[int, str] | None,
    teacher: Any = None,
    initializer: Any = None,
    image_size: int | None = None,
) -> ViTConfig:
    """The target's config from the bank if there is one (so every method builds the same architecture as
    WAVE), else from the teacher, at ``image_size`` (default the bank's or the teacher's); a target that would
    not fit in memory is refused before it is built."""
    if initializer is not None:
        config = initializer.vit_config(depth, width, num_heads, num_labels, id2label, image_size)
        vit_layout.check_buildable(vit_layout.shape_of(config), config.num_labels)
        return config
    if teacher is not None:
        source = load_teacher(teacher, image_size=image_size).config
        return config_like(source, depth, width, num_heads, num_labels, id2label)
    raise ValueError("need a teacher= or an initializer= to know the input geometry of the target ViT")


@torch.no_grad()
def model_from_encoder(config: ViTConfig, encoder_state: Mapping[str, Tensor], seed: int) -> ViTForImageClassification:
    """A stock model whose encoder is ``encoder_state`` and whose classifier is new (seeded).

    Built on the meta device and filled with ``assign=True`` (as ``WaveInitializer.build`` does): no random
    init is computed and thrown away, and ``strict=True`` catches a missing or extra key.
    """
    model = vit_layout.empty_classifier(config)
    head_init_(model, seed)
    state = {k: v.detach().clone().contiguous() for k, v in encoder_state.items()}
    state.update({k: v.detach() for k, v in model.classifier.state_dict(prefix=f"{vit_layout.CLASSIFIER}.").items()})
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model
