"""What wave-hf writes runs in ``transformers.pipeline("image-classification")`` in a fresh interpreter with
no wave_hf import, and predicts what ``wave_hf.data`` + the model predict (grey models included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

from wave_hf import WaveInitializer
from wave_hf.data import _to_pixels
from wave_hf.export import rgb_model, save_for_pipeline
from wave_hf.merge import merge

PIPELINE = """
import json, sys
from PIL import Image
from transformers import pipeline
classify = pipeline("image-classification", model=sys.argv[1], device="cpu")
out = [classify(Image.open(path), top_k=None) for path in sys.argv[2:]]
assert "wave_hf" not in sys.modules
print(json.dumps(out))
"""


def images(tmp_path, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")
    colour = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")
    paths = []
    for name, img in (("grey.png", grey), ("colour.png", colour)):
        img.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def expected(model: ViTForImageClassification, paths: list[str], prep=None) -> list[dict[str, float]]:
    """Label -> probability through wave_hf.data's own preprocessing."""
    c = model.config
    out = []
    for path in paths:
        x = _to_pixels(Image.open(path), c.image_size, c.num_channels, prep)[None]
        with torch.no_grad():
            probs = model(pixel_values=x).logits.softmax(-1)[0]
        out.append({c.id2label[i]: float(p) for i, p in enumerate(probs)})
    return out


def run_pipeline(folder, paths) -> list[dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", PIPELINE, str(folder), *paths], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [{d["label"]: d["score"] for d in preds} for preds in json.loads(res.stdout.strip().splitlines()[-1])]


def assert_same_predictions(got, want):
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert max(g, key=g.get) == max(w, key=w.get)
        for label in w:
            assert abs(g[label] - w[label]) < 1e-5, (label, g[label], w[label])


def tiny_vit(seed: int, channels: int = 1) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                    patch_size=7, num_channels=channels, num_labels=3,
                    id2label={0: "shirt", 1: "shoe", 2: "bag"}, label2id={"shirt": 0, "shoe": 1, "bag": 2})
    return ViTForImageClassification(cfg).eval()


def test_rgb_fold_is_exact_on_grey_images(tiny_init):
    model = tiny_init.build(2, 32, num_heads=2, num_labels=3)
    grey = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(pixel_values=grey).logits
        b = rgb_model(model)(pixel_values=grey.expand(-1, 3, -1, -1)).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert rgb_model(b_model := tiny_vit(0, channels=3)) is b_model


@pytest.mark.slow
def test_built_model_runs_in_a_pipeline_as_trained(tiny_init, tmp_path):
    model = tiny_init.build(2, 32, num_heads=2, id2label={0: "shirt", 1: "shoe", 2: "bag"})
    folder = save_for_pipeline(model, tmp_path / "vit", origin="test")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in folder.iterdir()}
    paths = images(tmp_path, 28)
    assert_same_predictions(run_pipeline(folder, paths), expected(model, paths))


@pytest.mark.slow
def test_merged_task_model_runs_in_a_pipeline_as_trained(tmp_path):
    merged = merge([tiny_vit(0), tiny_vit(1)], ["fashion", "bags"], method="average")
    task_model = merged.for_task("bags")
    folder = save_for_pipeline(task_model, tmp_path / "bags", origin="test merge")
    paths = images(tmp_path, 28)
    assert_same_predictions(run_pipeline(folder, paths), expected(task_model, paths))


@pytest.mark.slow
def test_teacher_preprocessing_travels_from_the_bank_to_the_pipeline(tmp_path):
    from conftest import tiny_config

    from wave_hf import TemplateBank
    from wave_hf.data import Preprocessing

    torch.manual_seed(0)
    cfg = tiny_config(num_channels=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    init = WaveInitializer(TemplateBank(cfg))
    model = init.build(2, 32, num_heads=2, id2label={0: "shirt", 1: "shoe", 2: "bag"})
    prep = Preprocessing.from_config(init.config)
    folder = save_for_pipeline(model, tmp_path / "vit", preprocessing=prep)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == [0.485, 0.456, 0.406] and saved["image_std"] == [0.229, 0.224, 0.225]
    paths = images(tmp_path, 28)
    assert_same_predictions(run_pipeline(folder, paths), expected(model, paths, prep))


def test_default_bank_build_has_a_pipeline_card(tmp_path):
    model = WaveInitializer.from_pretrained("default").build(2, 64, num_labels=3)
    folder = save_for_pipeline(model, tmp_path / "vit", origin="default bank", accuracy=0.5, dataset="fashion_mnist")
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "model-index" in card and "exact fold" in card
