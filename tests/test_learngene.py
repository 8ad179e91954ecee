"""TLEG's trained learngene (``wave_hf.baselines.learngene``): the expansion against a plain-torch reference, the
teacher start, training under the constraint, the round trip through disk, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from testing_common import assert_state_dicts_equal, random_images, tiny_vit_teacher
from transformers import ViTForImageClassification, ViTModel

from wave_hf import vit_layout
from wave_hf.baselines import Learngene, init_model, linear_fit, train_learngene
from wave_hf.baselines.learngene import auxiliary_model

SMOKE = dict(steps=3, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def teacher() -> ViTForImageClassification:
    return tiny_vit_teacher()


@pytest.fixture(scope="module")
def data() -> Dataset:
    return random_images(24, seed=5)


@pytest.fixture(scope="module")
def gene(teacher, data) -> Learngene:
    return train_learngene(teacher, data, 32, num_heads=2, eval_dataset=data, **SMOKE)


def test_descendant_layers_follow_tlegs_line_exactly(gene):
    """Layer l of an L-layer descendant is A + (l / L) B (TLEG's gene_tranfer, l = 0 .. L-1), in plain torch."""
    model = init_model("tleg_learngene", 5, 32, learngene=gene, num_labels=4)
    state = model.state_dict()
    for layer in range(5):
        for name in gene.layer_names:
            ref = gene.base[name] + (layer / 5) * gene.slope[name]
            assert torch.equal(state[vit_layout.layer_key(layer, name)], ref), (layer, name)
    for name in vit_layout.GLOBAL_TENSORS:
        assert torch.equal(state[vit_layout.global_key(name)], gene.globals[name])
    assert model.config.num_labels == 4 and type(model) is ViTForImageClassification


def test_teacher_start_is_the_line_through_the_teachers_layers(teacher, data):
    """At the teacher's width the start (before any step) is ``linear_fit`` of its layer stack, globals copied."""
    gene = train_learngene(teacher, data, 48, init="teacher", **{**SMOKE, "steps": 1}, lr=1e-12)
    src = teacher.state_dict()
    for name in ("q", "fc1", "ln1_weight"):
        base, slope = linear_fit(torch.stack([src[vit_layout.layer_key(i, name)] for i in range(3)]))
        torch.testing.assert_close(gene.base[name], base, atol=1e-6, rtol=0)
        torch.testing.assert_close(gene.slope[name], slope, atol=1e-6, rtol=0)
    torch.testing.assert_close(gene.globals["pos"], src[vit_layout.global_key("pos")], atol=1e-6, rtol=0)


def test_training_moves_the_learngene_and_records_how(teacher, data):
    start = train_learngene(teacher, data, 32, num_heads=2, **{**SMOKE, "steps": 1}, lr=1e-12)
    trained = train_learngene(teacher, data, 32, num_heads=2, **{**SMOKE, "steps": 30}, lr=3e-3)
    assert not torch.equal(start.base["q"], trained.base["q"])
    assert not torch.equal(start.slope["fc2"], trained.slope["fc2"])
    m = trained.metrics
    assert m["init"] == "teacher" and m["steps"] == 30 and m["lr"] == 3e-3 and m["loss_end"] < m["loss_start"]


def test_auxiliary_model_is_the_expansion_at_the_teachers_depth(gene, data):
    aux = auxiliary_model(gene)
    assert aux.config.num_hidden_layers == 3
    plain = ViTModel(aux.config, add_pooling_layer=False)
    plain.load_state_dict({k.removeprefix(vit_layout.ENCODER_PREFIX): v for k, v in aux.state_dict().items()
                           if k.startswith(vit_layout.ENCODER_PREFIX)})
    x = data[:4]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(aux.vit(x).last_hidden_state, plain.eval()(x).last_hidden_state)
    assert 0.0 <= gene.metrics["aux_accuracy"] <= 1.0 and 0.0 <= gene.metrics["teacher_accuracy"] <= 1.0


def test_same_seed_same_bits(teacher, data):
    a = train_learngene(teacher, data, 32, num_heads=2, seed=1, **SMOKE)
    b = train_learngene(teacher, data, 32, num_heads=2, seed=1, **SMOKE)
    assert_state_dicts_equal(a, b)


def test_scratch_start_wider_than_the_teacher(teacher, data):
    gene = train_learngene(teacher, data, 64, num_heads=4, **SMOKE)
    assert gene.metrics["init"] == "scratch" and gene.width == 64
    model = init_model("tleg_learngene", 2, 64, learngene=gene)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_round_trip_through_disk_and_plain_transformers(gene, tmp_path):
    gene.save_pretrained(tmp_path / "gene")
    again = Learngene.from_pretrained(tmp_path / "gene")
    assert_state_dicts_equal(gene, again)
    assert again.metrics == json.loads(json.dumps(gene.metrics))
    model = init_model("tleg_learngene", 4, 32, learngene=str(tmp_path / "gene"), seed=2)
    model.save_pretrained(tmp_path / "vit")
    assert_state_dicts_equal(model, ViTForImageClassification.from_pretrained(tmp_path / "vit"))


def test_bad_files_are_refused(gene, tmp_path):
    folder = tmp_path / "gene"
    gene.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "width": 64}))
    with pytest.raises(ValueError, match="does not match config.json"):
        Learngene.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a wave-hf learngene"):
        Learngene.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "depth": 10**9}))
    with pytest.raises(ValueError, match="depth"):
        Learngene.from_pretrained(folder)


def test_non_finite_learngene_is_not_saved(gene, tmp_path):
    broken = Learngene.from_pretrained(_saved(gene, tmp_path / "ok"))
    with torch.no_grad():
        broken.slope["fc1"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="slope.fc1.*NaN"):
        broken.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def _saved(gene: Learngene, folder) -> str:
    gene.save_pretrained(folder)
    return str(folder)


def test_errors_name_the_bad_value_and_the_accepted_one(gene, teacher, data):
    with pytest.raises(ValueError, match=r"width=64.*accepted: 32"):
        init_model("tleg_learngene", 2, 64, learngene=gene)
    with pytest.raises(ValueError, match="needs learngene="):
        init_model("tleg_learngene", 2, 32)
    with pytest.raises(ValueError, match=r"image_size=56.*accepted: 28"):
        init_model("tleg_learngene", 2, 32, learngene=gene, image_size=56)
    with pytest.raises(ValueError, match=r"width must be in \[1, 48\], got 96"):
        train_learngene(teacher, data, 96, init="teacher", **SMOKE)
    with pytest.raises(ValueError, match="init"):
        train_learngene(teacher, data, 32, init="zeros", **SMOKE)
    with pytest.raises(ValueError, match="image_size"):
        train_learngene(teacher, data, 32, image_size=30, **SMOKE)


def test_a_headless_teacher_teaches_through_its_cls_feature(teacher, data):
    """A teacher without logits (a DINOv2 backbone, here a headless ViT) distils by its final CLS feature
    through a map to its width; the learngene works at the requested image size."""
    headless = ViTModel(teacher.config, add_pooling_layer=False).eval()
    headless.load_state_dict({k.removeprefix(vit_layout.ENCODER_PREFIX): v for k, v in teacher.state_dict().items()
                              if k.startswith(vit_layout.ENCODER_PREFIX)})
    gene = train_learngene(headless, data, 32, num_heads=2, eval_dataset=data, **{**SMOKE, "steps": 20}, lr=3e-3)
    m = gene.metrics
    assert m["teacher_signal"] == "cls feature" and "aux_accuracy" not in m and m["aux_cls_r2"] <= 1.0
    assert m["loss_end"] < m["loss_start"]
    big = train_learngene(headless, data.map(lambda b: {"pixel_values": torch.nn.functional.interpolate(
        b["pixel_values"], size=56)}, batched=True).with_format("torch"), 32, num_heads=2, image_size=56, **SMOKE)
    assert big.shape.image_size == 56 and init_model("tleg_learngene", 2, 32, learngene=big).config.image_size == 56
