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
