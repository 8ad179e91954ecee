"""Stage 1 (``wave_hf.distill``): teacher-initialised and from-scratch distillation, resume, bad inputs."""

from __future__ import annotations

import datasets
import pytest
import torch
from testing_common import assert_state_dicts_equal
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from wave_hf import WaveTemplateConfig
from wave_hf.data import collate_images as collate
from wave_hf.distill import (
    aux_model,
    config_from_teacher,
    distill,
    distillation_loss,
    init_from_teacher,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def tiny_teacher(headless: bool = False, **overrides) -> ViTForImageClassification | ViTModel:
    torch.manual_seed(0)
    values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=28,
                  patch_size=7, num_channels=1, num_labels=4, layer_norm_eps=1e-6)
    config = ViTConfig(**{**values, **overrides})
    model = ViTModel(config, add_pooling_layer=False) if headless else ViTForImageClassification(config)
    with torch.no_grad():  # non-trivial LayerNorms and biases, so the vector decomposition is exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def image_dataset(n: int = 32, num_labels: int = 4, seed: int = 0, channels: int = 1) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 28, 28, generator=g)
    y = torch.randint(0, num_labels, (n,), generator=g)
    features = datasets.Features({
        "pixel_values": datasets.Array3D((channels, 28, 28), "float32"),
        "labels": datasets.ClassLabel(num_classes=num_labels),
    })
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.tolist()},
                                      features=features).with_format("torch")


def small_config(teacher, **overrides):
    return config_from_teacher(teacher, **{"template_width": 16, "num_templates": 3, "num_vector_templates": 2,
                                           **overrides})


def bank_loss(bank, teacher, dataset) -> float:
    batch = collate([dataset[i] for i in range(len(dataset))])
    model = aux_model(bank, teacher.config.num_labels, teacher=teacher)
    with torch.no_grad():
        z_t = teacher(batch["pixel_values"]).logits
        z_s = model(batch["pixel_values"]).logits
    return distillation_loss(z_s, z_t, batch["labels"], temperature=1.0, alpha=0.5).item()


def test_config_from_teacher_copies_geometry():
    teacher = tiny_teacher(layer_norm_eps=1e-5, qkv_bias=False)
    config = config_from_teacher(teacher, template_width=16)
    assert (config.aux_depth, config.aux_width, config.head_dim, config.mlp_ratio) == (2, 32, 16, 4)
    assert (config.image_size, config.patch_size, config.num_channels) == (28, 7, 1)
    assert config.layer_norm_eps == 1e-5 and config.qkv_bias is False
    assert (config.num_templates, config.num_vector_templates) == (6, 2)  # J = r = 32 / 16: exact vectors


def test_teacher_init_is_exact_with_full_rank():
    """N = number of columns of the rearranged stack (L * r * r) and J >= r: the auxiliary model *is* the teacher."""
    teacher = tiny_teacher()
    config = small_config(teacher, num_templates=2 * 2 * 2, num_vector_templates=2)
    model = aux_model(init_from_teacher(config, teacher), 4, teacher=teacher)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (model(x).logits - teacher(x).logits).abs().max().item()
    assert diff < 1e-4


def test_teacher_init_error_shrinks_with_more_templates():
    teacher = tiny_teacher()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z = teacher(x).logits
        errors = []
        for n in (1, 4, 8):
            model = aux_model(init_from_teacher(small_config(teacher, num_templates=n), teacher), 4, teacher=teacher)
            errors.append((model(x).logits - z).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8


def test_teacher_init_keeps_matrix_norms():
    """Truncation drops energy; ``match_norms`` gives every approximated layer matrix the teacher's norm back."""
    teacher = tiny_teacher()
    config = small_config(teacher, num_templates=2)
    state = {k: v for k, v in teacher.state_dict().items()}
    for match, close in ((True, True), (False, False)):
        bank = init_from_teacher(config, teacher, match_norms=match)
        built = bank()  # the auxiliary model's encoder tensors
        key = next(k for k in built if k.endswith("mlp.fc1.weight"))
        teacher_key = next(k for k in state if k.endswith(key.split("vit.", 1)[1]))
        ratio = (built[key].norm() / state[teacher_key].norm()).item()
        assert (abs(ratio - 1) < 1e-5) == close, ratio


def test_distill_lowers_the_loss():
    teacher, data = tiny_teacher(), image_dataset(32)
    config = small_config(teacher)
    start = init_from_teacher(config, teacher)
    bank = distill(teacher, data, config=config, steps=20, batch_size=32, lr=3e-3, warmup_ratio=0.0, progress=False)
    assert bank_loss(bank, teacher, data) < bank_loss(start, teacher, data)
    assert bank.config.metrics["distill_loss_end"] < bank.config.metrics["distill_loss_start"]
    assert not any(p.requires_grad for p in bank.parameters())


def test_distill_from_scratch_lowers_the_loss():
    teacher, data = tiny_teacher(), image_dataset(32)
    bank = distill(teacher, data, config=small_config(teacher), init="scratch", steps=15, batch_size=32, lr=3e-3,
                   progress=False)
    m = bank.config.metrics
    assert m["distill_init"] == "scratch" and m["distill_loss_end"] < m["distill_loss_start"]


def test_distill_records_provenance_and_accuracy(tmp_path):
    teacher = tiny_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    data = image_dataset(16)
    bank = distill(str(tmp_path / "teacher"), data, config=small_config(teacher), steps=2, batch_size=8,
                   eval_dataset=data, dataset_name="toy", progress=False)
    m = bank.config.metrics
    assert bank.config.teacher_name_or_path == str(tmp_path / "teacher")
    assert bank.config.teacher_dataset == "toy"
    for key in ("teacher_accuracy", "aux_accuracy_step0", "aux_accuracy"):
        assert 0.0 <= m[key] <= 1.0


def test_headless_teacher_uses_feature_mse():
    teacher, data = tiny_teacher(headless=True), image_dataset(16)
    config = small_config(teacher)
    start = init_from_teacher(config, teacher)
    bank = distill(teacher, data, config=config, steps=3, batch_size=8, progress=False)
    assert bank.config.metrics["distill_steps"] == 3
    assert not torch.equal(bank.templates["qkv"], start.templates["qkv"])
    assert all(torch.isfinite(p).all() for p in bank.parameters())


def test_resume_is_bit_identical_and_seeded(tmp_path):
    teacher, data = tiny_teacher(), image_dataset(24)
    kw = dict(config=small_config(teacher), steps=6, batch_size=8, lr=1e-3, checkpoint_every=2, progress=False)
    full = distill(teacher, data, output_dir=tmp_path / "full", **kw)
    part = distill(teacher, data, output_dir=tmp_path / "cut", max_steps=3, **kw)
    assert part.config.metrics["distill_steps"] == 3
    resumed = distill(teacher, data, output_dir=tmp_path / "cut", **kw)
    assert resumed.config.metrics["distill_steps"] == 6
    assert_state_dicts_equal(full, resumed)
    assert resumed.config.metrics["distill_loss_end"] == full.config.metrics["distill_loss_end"]
    again = distill(teacher, data, **kw)  # no checkpoints at all: same seed, same bits
    assert_state_dicts_equal(full, again)
    other = distill(teacher, data, seed=1, **kw)
    assert not torch.equal(other.templates["qkv"], full.templates["qkv"])


@pytest.mark.parametrize("field, overrides", [("patch_size", {"patch_size": 4}), ("num_channels", {"num_channels": 3}),
                                              ("image_size", {"image_size": 35})])
def test_teacher_geometry_mismatch_names_the_field(field, overrides):
    teacher = tiny_teacher()
    geometry = dict(template_width=16, num_templates=3, head_dim=16, aux_depth=2, aux_width=32, patch_size=7)
    config = WaveTemplateConfig(**{**geometry, **overrides})  # a bank config built for other images
    with pytest.raises(ValueError, match=field):
        distill(teacher, image_dataset(8), config=config, steps=1, progress=False)


def test_teacher_size_mismatch_names_the_field():
    teacher = tiny_teacher()
    config = WaveTemplateConfig(template_width=16, num_templates=3, head_dim=16, aux_depth=2, aux_width=48)
    with pytest.raises(ValueError, match="aux_width"):
        distill(teacher, image_dataset(8), config=config, steps=1, progress=False)


def test_bad_inputs_raise_clear_errors():
    teacher = tiny_teacher()
    config = small_config(teacher)
    data = image_dataset(8)
    with pytest.raises(ValueError, match="empty"):
        distill(teacher, data.select([]), config=config, steps=1, progress=False)
    no_labels = datasets.Dataset.from_dict({"pixel_values": torch.zeros(4, 1, 28, 28).numpy()}).with_format("torch")
    with pytest.raises(ValueError, match="labels"):
        distill(teacher, no_labels, config=config, steps=1, progress=False)
    wide = image_dataset(8, num_labels=9, seed=1)  # a head over 4 labels, data with 9
    with pytest.raises(ValueError, match="teacher predicts 4 labels, the data has num_labels=9"):
        distill(teacher, wide, config=config, teacher_head="logits", steps=1, progress=False)
    with pytest.warns(UserWarning, match="head is ignored"):  # auto: the head looks untrained for this data
        distill(teacher, wide, config=config, steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="init must be one of"):
        distill(teacher, data, config=config, init="random", steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        distill(teacher, data, config=config, steps=0, progress=False)
    with pytest.raises(TypeError, match=r"unknown options \['stepz'\]"):
        distill(teacher, data, config=config, stepz=1, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        distill(teacher, data, config=config, alpha=1.5, steps=1, progress=False)
    with pytest.raises(ValueError, match="template_width=64 must divide"):
        config_from_teacher(teacher)
    with pytest.raises(TypeError, match="ViTForImageClassification or a ViTModel"):
        distill(torch.nn.Linear(2, 2), data, config=config, steps=1, progress=False)
