"""``random``: the transformers default initialization of ``ViTForImageClassification``, seeded."""

from __future__ import annotations

from typing import Any

import torch
from transformers import ViTForImageClassification

from .common import reject_unknown, target_config
from .registry import register_init_method


@register_init_method("random", description="transformers' default ViT init (trunc-normal 0.02), seeded")
def random_init(
    depth: int,
    width: int,
    *,
    num_heads: int | None = None,
    num_labels: int = 10,
    teacher: Any = None,
    initializer: Any = None,
    train_dataset: Any = None,
    seed: int = 0,
    **kw: Any,
) -> ViTForImageClassification:
    """transformers' own ``_init_weights`` draws from the global RNG; it runs inside ``fork_rng`` so the
    seed fixes the bits without changing the caller's random state. Needs a teacher or a bank only for the
    input geometry."""
    id2label = kw.pop("id2label", None)
    reject_unknown("random", kw)
    config = target_config(depth, width, num_heads=num_heads, num_labels=num_labels, id2label=id2label,
                           teacher=teacher, initializer=initializer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    model.eval()
    return model
