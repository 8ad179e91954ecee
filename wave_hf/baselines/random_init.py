"""``random``: the transformers default initialization of ``ViTForImageClassification``, seeded."""

from __future__ import annotations

import torch
from transformers import ViTForImageClassification

from .common import target_config
from .registry import InitRequest, register_init_method


@register_init_method("random", description="transformers' default ViT init (trunc-normal 0.02), seeded")
def random_init(req: InitRequest) -> ViTForImageClassification:
    """transformers' own ``_init_weights`` draws from the global RNG; it runs inside ``fork_rng`` so the
    seed fixes the bits without changing the caller's random state. Needs a teacher or a bank only for the
    input geometry."""
    config = target_config(req.depth, req.width, num_heads=req.num_heads, num_labels=req.num_labels,
                           id2label=req.id2label, teacher=req.teacher, initializer=req.initializer,
                           image_size=req.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(req.seed)
        model = ViTForImageClassification(config)
    model.eval()
    return model
