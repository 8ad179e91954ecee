"""``WaveTemplateConfig`` validates itself; target sizes are validated against the bank."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from wave_hf import WaveTemplateConfig

BAD_CONFIGS = [
    ("template_width", 0, ValueError, "template_width must be in \\[1, 8192\\], got 0"),
    ("num_templates", -1, ValueError, "num_templates must be in \\[1, 1024\\], got -1"),
    ("num_templates", 2.5, TypeError, "num_templates must be an int, got 2.5"),
    ("patch_size", 5, ValueError, "patch_size=5 must divide image_size=28"),
    ("aux_width", 50, ValueError, "aux_width=50 must be a multiple of template_width=16"),
    ("layer_norm_eps", 0.0, ValueError, "layer_norm_eps must be a finite number in \\(0, 1\\), got 0.0"),
    ("hidden_act", "swishy", ValueError, "hidden_act='swishy' is not one of"),
    ("qkv_bias", "yes", TypeError, "qkv_bias must be a bool"),
]


@pytest.mark.parametrize("field, value, error, message", BAD_CONFIGS)
def test_bad_config_values(field, value, error, message):
    with pytest.raises(error, match=message):
        tiny_config(**{field: value})


def test_defaults_are_valid():
    cfg = WaveTemplateConfig()
    assert cfg.aux_ratio == 3 and cfg.num_tokens == 17


BAD_SIZES = [
    (dict(depth=0, width=32), ValueError, "depth must be in \\[1, 1024\\], got 0"),
    (dict(depth=2.0, width=32), TypeError, "depth must be an int, got 2.0"),
    (dict(depth=2, width=40), ValueError, "width=40 must be a positive multiple of the bank's template_width=16"),
    (dict(depth=2, width=0), ValueError, "width=0 must be a positive multiple"),
    (dict(depth=2, width=48, num_heads=5), ValueError, "num_heads=5 does not divide width=48; accepted: \\[1, 2, 3"),
    (dict(depth=2, width=32, num_labels=0), ValueError, "num_labels must be in \\[1, 100000\\], got 0"),
]


@pytest.mark.parametrize("size, error, message", BAD_SIZES)
@pytest.mark.parametrize("method", ["build", "parametrize"])
def test_bad_target_sizes(tiny_init, method, size, error, message):
    with pytest.raises(error, match=message):
        getattr(tiny_init, method)(**size)


def test_width_not_divisible_into_default_heads():
    from wave_hf import TemplateBank, WaveInitializer

    init = WaveInitializer(TemplateBank(tiny_config(head_dim=48, aux_width=48)))
    with pytest.raises(ValueError, match="width=32 is not a multiple of head_dim=48; pass num_heads"):
        init.build(depth=1, width=32)


def test_scalers_of_another_size_are_rejected(tiny_init):
    scalers = tiny_init.scalers_for(2, 32, num_heads=2)
    with pytest.raises(ValueError, match="scalers are for depth=2, width=32.*asked for depth=3"):
        tiny_init.build(depth=3, width=32, num_heads=2, scalers=scalers)
