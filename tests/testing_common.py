"""Helpers shared by the test modules (peft's ``testing_common`` pattern)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def assert_state_dicts_equal(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def load_in_fresh_python(model_dir: Path, pixel_values: torch.Tensor, tmp_path: Path) -> dict:
    """Load ``model_dir`` with plain transformers in a subprocess that never imports wave_hf."""
    inputs = tmp_path / "inputs.pt"
    torch.save(pixel_values, inputs)
    out = tmp_path / "logits.pt"
    code = f"""
import json, sys, torch
from transformers import ViTForImageClassification
model, info = ViTForImageClassification.from_pretrained({str(model_dir)!r}, output_loading_info=True)
model.eval()
with torch.no_grad():
    logits = model(torch.load({str(inputs)!r})).logits
torch.save(logits, {str(out)!r})
print(json.dumps({{"missing": info["missing_keys"], "unexpected": info["unexpected_keys"],
                  "wave_hf_imported": "wave_hf" in sys.modules}}, default=list))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    report["logits"] = torch.load(out)
    return report


def assert_same_results(a_path: Path, b_path: Path) -> None:
    """Two jobs' ``result.pt`` (a state dict the test's own job wrote) hold the same bits."""
    a, b = torch.load(a_path), torch.load(b_path)
    assert_state_dicts_equal(a, b)


def tiny_vit_teacher() -> ViTForImageClassification:  # noqa: F821
    """A tiny trained-looking 10-label teacher with the tiny bank's geometry (3 x 48, head_dim 16, patch 7,
    28x28x1): every parameter is nudged off its init, so non-trivial LayerNorms and biases are really copied."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=192,
                       image_size=28, patch_size=7, num_channels=1, num_labels=10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTForImageClassification(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def random_images(n: int, seed: int):
    """``n`` random 28x28 grey images with labels 0..9, as a torch-formatted ``datasets.Dataset``."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"pixel_values": torch.randn(n, 1, 28, 28, generator=gen).numpy(),
                              "labels": torch.randint(0, 10, (n,), generator=gen).tolist()}).with_format("torch")
