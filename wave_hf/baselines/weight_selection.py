"""``weight_selection``: Xu et al., "Initializing Models with Larger Ones" (ICLR 2024).

First-N layers of the teacher, then evenly spaced elements on every axis whose size shrinks (docs/wave.md
section 6): q, k and v separately (HF keeps them apart, so a selection never straddles their boundary),
o, fc1/fc2, biases, LayerNorms, the patch convolution's output channels, and the embedding axis of the
position embeddings and CLS token. The classifier is new. A target deeper or wider than the teacher cannot
be selected from it and raises. The teacher is any ``wave_hf.teachers.load_teacher`` input; selection reads its
stock ViT state (Dinov2's layer scale folded in), at the requested image size (position embeddings resampled
first, as the teacher family does).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import ViTForImageClassification

from .. import vit_layout
from ..teachers import Teacher, load_teacher
from .common import config_like, model_from_encoder
from .registry import InitRequest, register_init_method


def uniform_indices(teacher_size: int, student_size: int) -> Tensor:
    """Evenly spaced indices, Weight Selection's ``uniform_element_selection``.

    ``arange(s) * (t // s)`` when ``s`` divides ``t`` (every k-th index from 0, as the original), else
    ``linspace(0, t - 1, s).round()``. The original passes float indices that can reach ``t``; rounding a
    linspace that ends at ``t - 1`` keeps every index in range and strictly increasing.
    """
    if student_size < 1 or teacher_size < 1:
        raise ValueError(f"sizes must be >= 1, got teacher {teacher_size}, student {student_size}")
    if student_size > teacher_size:
        raise ValueError(f"cannot select {student_size} elements from {teacher_size}")
    if teacher_size % student_size == 0:
        return torch.arange(student_size) * (teacher_size // student_size)
    return torch.linspace(0, teacher_size - 1, student_size, dtype=torch.float64).round().long()


def select_tensor(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Shrink ``tensor`` to ``shape`` by ``uniform_indices`` on every axis that differs; always a copy."""
    if tensor.dim() != len(shape):
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} cannot become {shape}")
    out = tensor
    for axis, (t, s) in enumerate(zip(tensor.shape, shape)):
        if t != s:
            out = out.index_select(axis, uniform_indices(t, s))
    return out.clone() if out is tensor else out


def select_encoder(teacher: Teacher, shape: vit_layout.ViTShape) -> dict[str, Tensor]:
    """The target's encoder tensors selected from the teacher's (first ``shape.depth`` layers)."""
    teacher = load_teacher(teacher)
    source = teacher.shape
    if shape.depth > source.depth:
        raise ValueError(
            f"Weight Selection cannot build a model deeper than its teacher: depth={shape.depth}, teacher has "
            f"{source.depth} layers (depth must be in [1, {source.depth}])"
        )
    if shape.width > source.width:
        raise ValueError(
            f"Weight Selection cannot build a model wider than its teacher: width={shape.width}, teacher "
            f"hidden_size={source.width} (width must be in [1, {source.width}])"
        )
    for field in ("image_size", "patch_size", "num_channels", "mlp_ratio"):
        if getattr(shape, field) != getattr(source, field):
            raise ValueError(
                f"Weight Selection needs the teacher's {field}: target {getattr(shape, field)}, "
                f"teacher {getattr(source, field)}"
            )
    teacher_state = teacher.encoder_state()
    return {key: select_tensor(teacher_state[key], target) for key, target in vit_layout.tensor_shapes(shape).items()
            if key in teacher_state}  # no q/k/v biases without qkv_bias


@register_init_method("weight_selection", needs=("teacher",),
                      description="Weight Selection (Xu et al. 2024): first-N layers, evenly spaced elements")
def weight_selection(req: InitRequest) -> ViTForImageClassification:
    """The target keeps the teacher's geometry, eps and head size; only the classifier is random (seeded).
    Heads are regrouped (a student head takes every k-th dimension across teacher heads), as in the
    original method."""
    teacher = load_teacher(req.teacher, image_size=req.image_size)
    config = config_like(teacher.config, req.depth, req.width, req.num_heads, req.num_labels, req.id2label)
    encoder_state = select_encoder(teacher, vit_layout.shape_of(config))
    return model_from_encoder(config, encoder_state, req.seed)
