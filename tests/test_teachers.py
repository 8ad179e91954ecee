"""Teacher adapters (``wave_hf.teachers``): every family distils, fits and builds; layer-scale folding and
resolution changes are exact against the family's own forward; heads, preprocessing and bad combinations."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
from transformers.models.vit.modeling_vit import ViTEmbeddings

from wave_hf import WaveInitializer, WaveTemplateConfig, vit_layout
from wave_hf.cli import main as cli_main
from wave_hf.data import Preprocessing, load_image_dataset
from wave_hf.distill import (
    StudentOutputs,
    aux_model,
    config_from_teacher,
    distill,
    feature_r2,
    init_from_teacher,
)
from wave_hf.fit import fit_model
from wave_hf.teachers import load_teacher

SMALL = dict(template_width=16, num_templates=3, num_vector_templates=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _jitter(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial biases, LayerNorms and layer scales (random per channel), so folding is really tested."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.copy_(torch.rand_like(p) * 2 - 0.5)
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif "token" in name or "position" in name:
                p.normal_(0, 0.5)
    return model.eval()


def make(family: str, num_labels: int = 4, **overrides) -> torch.nn.Module:
    """A tiny random teacher of each family (hidden 32-48, 2 layers, 28 px, patch 7, RGB)."""
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
                  num_channels=3, num_labels=num_labels, layer_norm_eps=1e-6)
    if family.startswith("dinov2"):
        config = Dinov2Config(**{**common, "hidden_size": 48, "num_attention_heads": 3, "mlp_ratio": 4,
                                 "layerscale_value": 0.5, **overrides})
        model = Dinov2Model(config) if family == "dinov2_headless" else Dinov2ForImageClassification(config)
    elif family.startswith("deit"):
        config = DeiTConfig(**{**common, "intermediate_size": 64, **overrides})
        model = (DeiTForImageClassificationWithTeacher if family == "deit_distilled" else DeiTForImageClassification)(config)
    else:
        config = ViTConfig(**{**common, "intermediate_size": 128, **overrides})
        model = ViTModel(config, add_pooling_layer=False) if family == "vit_headless" else ViTForImageClassification(config)
    return _jitter(model)


def images(n: int = 16, size: int = 28, num_labels: int = 4, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    features = datasets.Features({"pixel_values": datasets.Array3D((3, size, size), "float32"),
                                  "labels": datasets.ClassLabel(num_classes=num_labels)})
    return datasets.Dataset.from_dict({"pixel_values": torch.randn(n, 3, size, size, generator=g).numpy(),
                                       "labels": torch.randint(0, num_labels, (n,), generator=g).tolist()},
                                      features=features).with_format("torch")


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("size", [28, 56])
def test_dinov2_layer_scale_folded_exactly(size):
    """The stock ViT the adapter builds (layer scale folded into o_proj/fc2) is ``Dinov2Model`` itself, at its
    own size and at another one (Dinov2 always interpolates its position grid)."""
    model = make("dinov2")
    teacher = load_teacher(model, image_size=size)
    assert teacher.exact and isinstance(teacher.encoder, ViTModel)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.dinov2(x, output_hidden_states=True)
        ours = teacher(x, hidden_states=True)
        ref_logits = model(x).logits
    assert max_diff(ours.hidden_states, ref.hidden_states[1:]) < 1e-5
    assert max_diff([ours.last_hidden_state], [ref.last_hidden_state]) < 1e-5
    assert max_diff([ours.logits], [ref_logits]) < 1e-5
    built = vit_layout.encoder_from_state(teacher.config, teacher.encoder_state())  # the state alone suffices
    with torch.no_grad():
        assert max_diff([built(x).last_hidden_state], [ref.last_hidden_state]) < 1e-5


@pytest.mark.parametrize("family", ["vit", "deit", "deit_distilled"])
def test_resolution_matches_the_familys_interpolation(family):
    """Resampled once at load, the teacher computes what the model computes with interpolate_pos_encoding=True."""
    model = make(family)
    teacher = load_teacher(model, image_size=42)
    x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x, interpolate_pos_encoding=True, output_hidden_states=True)
        ours = teacher(x, hidden_states=True)
    assert max_diff([ours.logits], [ref.logits]) < 1e-5
    if family == "vit":
        assert max_diff(ours.hidden_states, ref.hidden_states[1:]) < 1e-5
    else:  # DeiT: the distillation token (index 1) is not a stock ViT token
        assert all(h.shape[1] == 1 + 36 for h in ours.hidden_states)
        assert not teacher.exact
    assert teacher.encoder_state()[vit_layout.global_key("pos")].shape == (1, 37, 32)


def test_resample_positions_is_the_families_own():
    """``vit_layout.resample_positions`` (used for banks) equals ViT's and Dinov2's interpolate_pos_encoding."""
    pos = torch.randn(1, 1 + 16, 48)
    for cls, config in ((ViTEmbeddings, ViTConfig(hidden_size=48, image_size=28, patch_size=7)),
                        (Dinov2Embeddings, Dinov2Config(hidden_size=48, image_size=28, patch_size=7))):
        emb = cls(config)
        with torch.no_grad():
            emb.position_embeddings.copy_(pos)
        ref = emb.interpolate_pos_encoding(torch.zeros(1, 1 + 64, 48), 56, 56)
        assert torch.equal(vit_layout.resample_positions(pos, 56, 7), ref), cls.__name__


# ---------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", ["vit", "vit_headless", "deit", "deit_distilled", "dinov2", "dinov2_headless"])
def test_every_family_distils_fits_and_builds(family):
    model, data = make(family), images(16)
    bank = distill(model, data, config=config_from_teacher(model, **SMALL), steps=3, batch_size=8, progress=False,
                   layer_weight=1.0)
    m = bank.config.metrics
    assert m["distill_steps"] == 3 and m["distill_loss_end"] == m["distill_loss_end"]  # finite
    assert bank.config.resample in ("bilinear", "bicubic") and len(bank.config.image_mean) == 3
    init = WaveInitializer(bank)
    fitted = fit_model(init, 1, 16, data, teacher=model, steps=2, batch_size=8, max_images=16, progress=False,
                       layer_weight=1.0)
    built = init.build(2, 32, num_labels=4)
    x = data[:2]["pixel_values"]
    with torch.no_grad():
        assert fitted(x).logits.shape == (2, 4) and built(x).logits.shape == (2, 4)


# ------------------------------------------------------------------------------------- teacher forcing
def test_teacher_forced_student_of_an_exact_bank_reproduces_every_teacher_state():
    """Full capacity (N = L r^2 templates, J = r): the teacher-forced embeddings and blocks, and the chain's
    feature, equal the teacher's own (Dinov2: layer scale folded), so the forced loss starts at 0 there."""
    model = make("dinov2_headless")
    teacher = load_teacher(model, head="none")
    config = config_from_teacher(teacher, template_width=16, num_templates=2 * 3 * 3, num_vector_templates=3)
    student = StudentOutputs(aux_model(init_from_teacher(config, teacher), 4), blocks=True)
    x = images(4)[:]["pixel_values"]
    with torch.no_grad():
        target = teacher(x, hidden_states=True)
        states = (target.embeddings, *target.hidden_states)
        feature, _, _, outputs = student(x, states)
    assert len(outputs) == len(states) == 3
    assert max_diff(outputs, states) < 1e-4
    assert max_diff([feature], [target.feature]) < 1e-4


def test_teacher_forcing_trains_another_bank_and_is_recorded():
    model, data = make("dinov2_headless"), images(16)
    kw = dict(config=config_from_teacher(model, **SMALL), steps=3, batch_size=8, progress=False, layer_weight=1.0)
    mixed, chained = distill(model, data, forced_weight=1.0, **kw), distill(model, data, **kw)
    alone = distill(model, data, **{**kw, "layer_weight": 0.0}, feature_weight=0.0, forced_weight=1.0)
    assert mixed.config.metrics["distill_forced_weight"] == 1.0 and chained.config.metrics["distill_forced_weight"] == 0
    assert not kw["config"].metrics  # each bank records into its own copy, never into the caller's config
    for bank in (mixed, alone):
        loss = bank.config.metrics["distill_loss_end"]
        assert loss == loss and not torch.equal(bank.templates["qkv"], chained.templates["qkv"])
    with pytest.raises(ValueError, match="forced_weight must be a finite number >= 0.0, got -1.0"):
        distill(model, data, forced_weight=-1.0, **kw)


# ------------------------------------------------------------------------------------------ resolution
def test_bank_distilled_at_one_size_builds_and_fits_at_another():
    model = make("dinov2")  # native 28 px
    data56 = images(16, size=56)
    bank = distill(model, data56, config=config_from_teacher(model, image_size=56, **SMALL), image_size=56,
                   steps=2, batch_size=8, progress=False)
    assert (bank.config.image_size, bank.config.teacher_image_size) == (56, 28)
    init = WaveInitializer(bank)
    native = init.build(2, 48, num_labels=4)
    other = init.build(2, 48, num_labels=4, image_size=84)
    assert other.config.image_size == 84
    pos = vit_layout.global_key("pos")
    expected = vit_layout.resample_positions(native.state_dict()[pos], 84, 7)
    assert torch.allclose(other.state_dict()[pos], expected, atol=1e-6)
    for key, value in native.state_dict().items():  # nothing else depends on the image size
        if key != pos:
            assert torch.equal(value, other.state_dict()[key]), key
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        assert torch.isfinite(other(x).logits).all()
    fitted = fit_model(init, 1, 16, images(16, size=28), teacher=model, image_size=28, steps=2, batch_size=8,
                       progress=False)  # fit at 28 px from a 56 px bank; the teacher is resampled to 28 too
    assert fitted.config.image_size == 28
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of the bank's patch_size=7"):
        init.build(1, 16, image_size=30)


# ------------------------------------------------------------------------------------------------ heads
def test_teacher_head_none_ignores_a_trained_head(tmp_path):
    model, data = make("vit"), images(16)
    bank = distill(model, data, config=config_from_teacher(model, **SMALL), teacher_head="none", steps=2,
                   batch_size=8, eval_dataset=data, progress=False)
    m = bank.config.metrics
    assert "teacher_accuracy" not in m and m["distill_alpha"] == 1.0
    assert {"aux_cls_r2", "aux_patch_mean_r2", "aux_cls_r2_step0"} <= set(m)
    assert not load_teacher(model, head="none").has_head and load_teacher(model).has_head


def test_missing_classifier_is_dropped_with_a_warning(tmp_path):
    make("vit_headless").save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    config["architectures"] = ["ViTForImageClassification"]  # says "classifier", has none
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="classifier is missing"):
        teacher = load_teacher(tmp_path / "t")
    assert not teacher.has_head and "missing" in teacher.head_status
    with pytest.raises(ValueError, match="teacher_head='logits'"):
        load_teacher(tmp_path / "t", head="logits")


def test_cli_headless_dinov2_end_to_end(tmp_path, capsys):
    """distill (head none, another image size, layer-wise) -> fit against the teacher's features -> build."""
    pytest.importorskip("sklearn")
    model = make("dinov2")
    model.save_pretrained(tmp_path / "teacher")
    common = ["--json", "--seed", "0"]
    assert cli_main(["distill", "--teacher", str(tmp_path / "teacher"), "--teacher-head", "none", "--image-size", "14",
                     "--data", "digits", "--steps", "2", "--batch-size", "8", "--template-width", "16",
                     "--forced-weight", "0.5", "--out", str(tmp_path / "bank"), *common]) == 0
    config = json.loads((tmp_path / "bank" / "config.json").read_text())
    assert config["metrics"]["distill_forced_weight"] == 0.5
    assert config["image_size"] == 14 and config["resample"] == "bicubic" and config["image_mean"][0] == 0.485
    assert "aux_cls_r2" in config["metrics"] and "teacher_accuracy" not in config["metrics"]
    capsys.readouterr()
    assert cli_main(["fit", "--templates", str(tmp_path / "bank"), "--teacher", str(tmp_path / "teacher"),
                     "--teacher-head", "none", "--layer-weight", "1", "--depth", "1", "--width", "16", "--data",
                     "digits", "--steps", "2", "--max-images", "16", "--out", str(tmp_path / "fitted"), *common]) == 0
    assert cli_main(["build", "--templates", str(tmp_path / "fitted"), "--depth", "1", "--width", "16",
                     "--image-size", "28", "--out", str(tmp_path / "vit"), *common]) == 0
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["image_size"] == 28


# ------------------------------------------------------------------------------------------ preprocessing
def test_preprocessing_from_the_image_processor_is_stored_and_used(tmp_path):
    from transformers import ViTImageProcessorPil

    model = make("vit")
    model.save_pretrained(tmp_path / "t")
    ViTImageProcessorPil(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.6, 0.7], resample=3).save_pretrained(tmp_path / "t")
    teacher = load_teacher(tmp_path / "t")
    assert teacher.preprocessing.image_mean == (0.1, 0.2, 0.3) and teacher.preprocessing.resample == "bicubic"
    config = config_from_teacher(teacher, **SMALL)
    assert config.image_mean == [0.1, 0.2, 0.3] and config.image_std == [0.5, 0.6, 0.7]
    config.save_pretrained(tmp_path / "bank")
    raw = json.loads((tmp_path / "bank" / "config.json").read_text())
    for key in ("image_mean", "image_std", "resample", "teacher_image_size"):  # an older bank has none of them
        raw.pop(key)
    (tmp_path / "bank" / "config.json").write_text(json.dumps(raw))
    old = WaveTemplateConfig.from_pretrained(tmp_path / "bank")
    assert old.image_mean is None and Preprocessing.from_config(old) == Preprocessing()
    pytest.importorskip("sklearn")
    grey = load_image_dataset("digits", image_size=8, num_channels=3, preprocessing=teacher.preprocessing)
    raw_pixels = torch.tensor(grey["train"].with_format(None)[0]["image"], dtype=torch.float32) / 255
    expected = (raw_pixels[None] - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor([0.5, 0.6, 0.7])[:, None, None]
    assert torch.allclose(grey["train"][0]["pixel_values"], expected, atol=1e-6)


# ----------------------------------------------------------------------------------------- bad inputs
def test_bad_combinations_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of the teacher's patch_size=7"):
        load_teacher(make("vit"), image_size=30)
    with pytest.raises(ValueError, match="use_swiglu_ffn=True"):
        load_teacher(make("dinov2_headless", use_swiglu_ffn=True))
    swiglu = make("dinov2_headless", use_swiglu_ffn=True)
    swiglu.save_pretrained(tmp_path / "swiglu")
    with pytest.raises(ValueError, match="use_swiglu_ffn=True"):
        distill(str(tmp_path / "swiglu"), images(8), steps=1, progress=False)
    with pytest.raises(ValueError, match="mlp_ratio=2.5"):
        load_teacher(make("vit", intermediate_size=80))
    with pytest.raises(TypeError, match="ViTForImageClassification or a ViTModel"):
        load_teacher(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="teacher_head must be one of"):
        load_teacher(make("vit"), head="maybe")
    with pytest.raises(ValueError, match="has no trained classification head"):
        load_teacher(make("vit_headless"), head="logits")
    from transformers import ConvNextConfig  # a model of another family is named by its model_type

    ConvNextConfig().save_pretrained(tmp_path / "convnext")
    with pytest.raises(ValueError, match="model_type='convnext'"):
        load_teacher(tmp_path / "convnext")


def test_feature_r2_is_one_for_the_teacher_itself():
    model, data = make("vit"), images(8)
    assert feature_r2(ViTForImageClassification(model.config).eval(), model, data)["cls_r2"] < 0.9
    assert feature_r2(model, model, data) == {"cls_r2": 1.0, "patch_mean_r2": 1.0}
