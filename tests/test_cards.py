"""Every card wave-hf writes parses as Hub metadata: repo ids only where the Hub expects them, a model-index
only for measured results, and no pipeline tag on a bank (no pipeline can load one)."""

from __future__ import annotations

import logging

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import ViTConfig, ViTForImageClassification

from wave_hf import WaveInitializer
from wave_hf.cards import is_repo_id
from wave_hf.export import save_for_pipeline
from wave_hf.merge import merge


def tiny_vit(seed: int, source: str) -> ViTForImageClassification:
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=28, patch_size=7, num_channels=1,
                                                num_labels=3))
    model.config._name_or_path = source
    return model


def load_card(folder) -> dict:
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    for key in ("base_model", "datasets"):
        values = meta.get(key)
        for value in [values] if isinstance(values, str) else values or []:
            assert is_repo_id(value), (key, value)
    if "model-index" in meta:
        name, results = model_index_to_eval_results(meta["model-index"])
        assert name and results and all(isinstance(r.metric_value, float) for r in results)
    return meta


def test_bank_card(tiny_bank, tmp_path, caplog):
    tiny_bank.config.teacher_name_or_path = str(tmp_path / "local-teacher")  # a local path never reaches the card
    tiny_bank.config.teacher_dataset = "fashion_mnist"
    tiny_bank.config.metrics = {"aux_accuracy": 0.8}
    with caplog.at_level(logging.WARNING):
        tiny_bank.save_pretrained(tmp_path / "bank")
    meta = load_card(tmp_path / "bank")
    assert "pipeline_tag" not in meta and "base_model" not in meta and "datasets" not in meta
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "wave-hf"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.8


def test_bank_card_keeps_repo_ids(tiny_bank, tmp_path):
    tiny_bank.config.teacher_name_or_path = "facebook/dinov2-small"
    tiny_bank.config.teacher_dataset = "zalando-datasets/fashion_mnist"
    tiny_bank.save_pretrained(tmp_path / "bank")
    meta = load_card(tmp_path / "bank")
    assert meta["base_model"] == "facebook/dinov2-small" and meta["datasets"] == ["zalando-datasets/fashion_mnist"]


def test_bank_with_scalers_card(tiny_init, tmp_path):
    tiny_init.add_scalers(tiny_init.scalers_for(1, 16))
    tiny_init.save_pretrained(tmp_path / "bank")
    assert load_card(tmp_path / "bank")["library_name"] == "wave-hf"


@pytest.mark.parametrize("accuracy", [None, 0.75])
def test_built_model_card(tmp_path, accuracy):
    model = WaveInitializer.from_pretrained("default").build(2, 64, num_labels=3)
    save_for_pipeline(model, tmp_path / "vit", origin="test", accuracy=accuracy, dataset="fashion_mnist",
                      base_model="/a/local/path")
    meta = load_card(tmp_path / "vit")
    assert meta["pipeline_tag"] == "image-classification" and "base_model" not in meta
    assert ("model-index" in meta) == (accuracy is not None)


def test_merge_card_drops_local_sources(tmp_path):
    merged = merge([tiny_vit(0, "org/vit-a"), tiny_vit(1, str(tmp_path / "local-vit"))], ["a", "b"], "average")
    merged.save_pretrained(tmp_path / "merged", accuracies={"a": 0.5, "b": 0.25})
    meta = load_card(tmp_path / "merged")
    assert meta["base_model"] == ["org/vit-a"]
