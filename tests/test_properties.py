"""Property test: for any valid size and bank shape, shapes match a ViTConfig and folding is exact."""

from __future__ import annotations

import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import ViTConfig, ViTForImageClassification

from wave_hf import TemplateBank, WaveInitializer, fold


@st.composite
def cases(draw):
    template_width = draw(st.sampled_from([4, 8]))
    aux_ratio = draw(st.integers(1, 3))
    num_templates = draw(st.integers(1, 4))
    num_vector_templates = draw(st.integers(1, 3))
    r = draw(st.integers(1, 4))
    width = template_width * r
    heads = draw(st.sampled_from([h for h in range(1, width + 1) if width % h == 0 and h <= 8]))
    depth = draw(st.integers(1, 4))
    cfg = tiny_config(template_width=template_width, head_dim=template_width, aux_width=template_width * aux_ratio,
                      aux_depth=draw(st.integers(1, 4)), num_templates=num_templates,
                      num_vector_templates=num_vector_templates, mlp_ratio=draw(st.sampled_from([1, 2, 4])))
    return cfg, depth, width, heads, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(cases())
def test_shapes_and_exact_fold(case):
    cfg, depth, width, heads, seed = case
    torch.manual_seed(seed)
    init = WaveInitializer(TemplateBank(cfg))
    model = init.build(depth, width, num_heads=heads, num_labels=3, seed=seed)
    ref = ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                    intermediate_size=cfg.mlp_ratio * width, image_size=28, patch_size=7, num_channels=1,
                    num_labels=3)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ViTForImageClassification(ref).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    param = init.parametrize(depth, width, num_heads=heads, num_labels=3, seed=seed)
    with torch.no_grad():
        for p in param.wave_source.scalers.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        before = param(x).logits
        after = fold(param)(x).logits
    assert (before - after).abs().max() <= 1e-6 * max(1.0, before.abs().max().item())
