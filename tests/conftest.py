"""Shared fixtures: tiny banks so the whole suite stays well under the CI budget on 2 cores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from wave_hf import TemplateBank, WaveInitializer, WaveTemplateConfig

TINY = dict(template_width=16, num_templates=3, num_vector_templates=3, head_dim=16, aux_depth=3, aux_width=48)


def tiny_config(**overrides) -> WaveTemplateConfig:
    return WaveTemplateConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny_bank() -> TemplateBank:
    torch.manual_seed(0)
    return TemplateBank(tiny_config())


@pytest.fixture
def tiny_init(tiny_bank: TemplateBank) -> WaveInitializer:
    return WaveInitializer(tiny_bank)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_thread():
    """Tiny models run ~10x faster on one thread when the 2 shared cores are busy (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
