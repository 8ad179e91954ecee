"""Kronecker-parametrized ViTs (for fitting) and ``fold``, which turns them into plain weights.

A parametrized model is a stock ``ViTForImageClassification`` whose encoder tensors are computed on every
access from the bank's templates and a ``Scalers`` (``torch.nn.utils.parametrize``). It trains like any
model; ``fold`` then removes the parametrizations and returns the same object as a plain ViT.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import ViTForImageClassification

from . import vit_layout
from .configuration_wave import WaveTemplateConfig
from .rule import TensorRule, tensor_rules
from .scalers import Scalers

SOURCE_ATTR = "wave_source"


class WaveSource(nn.Module):
    """Templates (frozen unless ``train_templates``) and the scalers a parametrized model reads."""

    def __init__(self, templates: Mapping[str, Tensor], scalers: Scalers, train_templates: bool = False):
        super().__init__()
        self.templates = nn.ParameterDict(
            {k: nn.Parameter(v.detach().clone(), requires_grad=train_templates) for k, v in templates.items()}
        )
        self.scalers = scalers


class _Built(nn.Module):
    """Parametrization that ignores the stored tensor and returns the rule's output."""

    def __init__(self, source: WaveSource, rule: TensorRule):
        super().__init__()
        object.__setattr__(self, "_source", source)  # a reference, not a submodule: no duplicate state
        self._rule = rule

    def forward(self, _placeholder: Tensor) -> Tensor:
        return self._rule(self._source.templates, self._source.scalers)


def head_init_(model: ViTForImageClassification, seed: int) -> None:
    """The classifier as transformers initializes it (trunc-normal, std ``initializer_range``), seeded."""
    gen = torch.Generator().manual_seed(seed)
    head = model.classifier
    head.to_empty(device="cpu")
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=model.config.initializer_range, generator=gen)
        head.bias.zero_()


def parametrize_vit(
    config: WaveTemplateConfig,
    templates: Mapping[str, Tensor],
    scalers: Scalers,
    vit_config,
    *,
    seed: int = 0,
    train_templates: bool = False,
) -> ViTForImageClassification:
    """A ``ViTForImageClassification`` whose encoder is computed from ``templates`` and ``scalers``."""
    model = vit_layout.empty_classifier(vit_config)
    head_init_(model, seed)
    source = WaveSource(templates, scalers, train_templates)
    for key, rule in tensor_rules(config, scalers.depth, scalers.width).items():
        module_path, _, attr = key.rpartition(".")
        module = model.get_submodule(module_path)
        # A 0-element placeholder: the real tensor lives only as templates x scalers.
        setattr(module, attr, nn.Parameter(torch.empty(0), requires_grad=False))
        parametrize.register_parametrization(module, attr, _Built(source, rule), unsafe=True)
    model.add_module(SOURCE_ATTR, source)
    return model


def is_parametrized(model: nn.Module) -> bool:
    return hasattr(model, SOURCE_ATTR)


@torch.no_grad()
def fold(model: ViTForImageClassification) -> ViTForImageClassification:
    """Replace every parametrized tensor by its current value and drop the templates and scalers.

    In place, like ``merge_and_unload``; returns the (now plain) model. Every parameter is trainable
    afterwards, ready for full fine-tuning.
    """
    if not is_parametrized(model):
        raise ValueError("model is not a wave-hf parametrized ViT (did you call WaveInitializer.parametrize?)")
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    delattr(model, SOURCE_ATTR)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
