"""Layer-wise learning-rate decay in the fine-tune (issue 17): the parameter groups, the lrs, the weight-decay
exclusions, the Trainer's scheduler over the groups, bit-for-bit "off" at 1.0, and refused values."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import wave_hf.train as train_module
from wave_hf.cli import main as cli_main
from wave_hf.train import finetune, layer_decay_optimizer, layerwise_lr_groups

DEPTH = 3


def tiny_vit(seed: int = 0, depth: int = DEPTH) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=16, num_hidden_layers=depth, num_attention_heads=2, intermediate_size=32,
                       image_size=28, patch_size=7, num_channels=1, num_labels=3)
    return ViTForImageClassification(config)


def data(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(1, 28, 28, generator=g), "labels": i % 3} for i in range(n)]


def expected_scale(model: ViTForImageClassification, decay: float) -> dict[int, float]:
    """lr multiplier by parameter id, from the module tree (no key strings): the formula of the issue."""
    depth = model.config.num_hidden_layers
    out = {id(p): decay ** (depth + 1) for p in model.vit.embeddings.parameters()}
    for layer, block in enumerate(model.vit.layers):
        out.update({id(p): decay ** (depth - layer) for p in block.parameters()})
    for module in (model.vit.layernorm, model.classifier):
        out.update({id(p): 1.0 for p in module.parameters()})
    return out


@pytest.mark.parametrize("decay", [1.0, 0.75, 0.5])
def test_groups_cover_every_trainable_parameter_once_with_the_formula_lrs(decay):
    model = tiny_vit()
    groups = layerwise_lr_groups(model, 1e-3, decay, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    scale = expected_scale(model, decay)
    assert set(scale) == set(ids)  # the formula names every parameter: nothing falls between the rules
    for g in groups:
        for p in g["params"]:
            assert math.isclose(g["lr"], 1e-3 * scale[id(p)], rel_tol=1e-12)
    assert groups[0]["lr"] == 1e-3  # the group the Trainer logs has the full lr
    assert all(g["params"] for g in groups)


def test_frozen_parameters_are_left_out():
    model = tiny_vit()
    model.vit.embeddings.requires_grad_(False)
    ids = {id(p) for g in layerwise_lr_groups(model, 1e-3, 0.8, 0.05) for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert not ids & {id(p) for p in model.vit.embeddings.parameters()}


def test_weight_decay_exclusions_are_the_trainers(tmp_path):
    model = tiny_vit()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    decayed = set(Trainer(model=model, args=args).get_decay_parameter_names(model))
    assert decayed and not any("bias" in n for n in decayed)
    by_id = {id(p): n for n, p in model.named_parameters()}
    for g in layerwise_lr_groups(model, 1e-3, 0.7, 0.05):
        names = {by_id[id(p)] for p in g["params"]}
        assert names <= decayed if g["weight_decay"] == 0.05 else not names & decayed, names
        assert g["weight_decay"] in (0.05, 0.0)


def test_the_trainers_scheduler_keeps_the_ratios(tmp_path):
    model = tiny_vit()
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=2e-3, weight_decay=0.05,
                             lr_scheduler_type="cosine", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=layer_decay_optimizer(args, model, 0.5))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    base = [g["lr"] for g in trainer.optimizer.param_groups]
    assert base == [g["lr"] for g in layerwise_lr_groups(model, 2e-3, 0.5, 0.05)]
    for _ in range(4):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    now = [g["lr"] for g in trainer.optimizer.param_groups]
    assert 0 < now[0] < base[0]
    for b, n in zip(base, now):
        assert math.isclose(n / now[0], b / base[0], rel_tol=1e-9)


def test_layer_decay_one_is_todays_training_bit_for_bit(tmp_path, one_thread):
    kw = dict(epochs=2, batch_size=8, learning_rate=1e-3, progress=False)
    before = finetune(tiny_vit(), data(24), output_dir=tmp_path / "a", **kw)
    off = finetune(tiny_vit(), data(24), output_dir=tmp_path / "b", layer_decay=1.0, **kw)
    for k, v in before.state_dict().items():
        assert torch.equal(v, off.state_dict()[k]), k
    on = finetune(tiny_vit(), data(24), output_dir=tmp_path / "c", layer_decay=0.5, **kw)
    start = tiny_vit().state_dict()
    assert all(not torch.equal(v, start[k]) for k, v in on.state_dict().items())  # every group trains
    assert not torch.equal(on.vit.embeddings.cls_token, before.vit.embeddings.cls_token)


def test_the_groups_at_one_reproduce_the_trainers_own_optimizer(tmp_path, monkeypatch, one_thread):
    """Forcing the grouped optimizer at decay 1.0 gives the Trainer's own updates bit for bit: same optimizer
    class and kwargs, same lrs, same weight-decay exclusions."""
    kw = dict(epochs=2, batch_size=8, learning_rate=1e-3, progress=False)
    stock = finetune(tiny_vit(), data(24), output_dir=tmp_path / "a", **kw)
    calls = []

    def forced(args, model, layer_decay):
        calls.append(layer_decay)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        return cls, {**kwargs, "params": layerwise_lr_groups(model, args.learning_rate, 1.0, args.weight_decay)}

    monkeypatch.setattr(train_module, "layer_decay_optimizer", forced)
    grouped = finetune(tiny_vit(), data(24), output_dir=tmp_path / "b", **kw)
    assert calls == [1.0]
    for k, v in stock.state_dict().items():
        assert torch.equal(v, grouped.state_dict()[k]), k


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, 1.0000001, math.nan, math.inf, -math.inf])
def test_out_of_range_values_raise_naming_the_value_and_the_range(bad):
    for call in (lambda: layerwise_lr_groups(tiny_vit(depth=1), 1e-3, bad, 0.05),
                 lambda: finetune(tiny_vit(depth=1), data(4), layer_decay=bad, progress=False)):
        with pytest.raises(ValueError, match=r"layer_decay must be a finite number in \(0, 1\]") as err:
            call()
        assert repr(bad) in str(err.value)


@pytest.mark.parametrize("bad", ["0.5", True, None, [0.5]])
def test_non_numbers_raise_a_type_error_naming_the_value(bad):
    with pytest.raises(TypeError, match="layer_decay must be a number") as err:
        finetune(tiny_vit(depth=1), data(4), layer_decay=bad, progress=False)
    assert repr(bad) in str(err.value)


def test_layerwise_lr_groups_refuses_other_models():
    with pytest.raises(TypeError, match="ViTForImageClassification"):
        layerwise_lr_groups(tiny_vit().vit, 1e-3, 0.5, 0.05)


def test_cli_train_takes_layer_decay_and_refuses_values_outside_the_range(capsys):
    from wave_hf.cli import build_parser

    base = ["train", "--depth", "1", "--width", "16", "--data", "digits", "--out", "unused"]
    assert build_parser().parse_args(base).layer_decay == 1.0
    assert build_parser().parse_args([*base, "--layer-decay", "0.75"]).layer_decay == 0.75
    for bad in ("1.5", "0", "nan"):
        assert cli_main([*base, "--layer-decay", bad]) == 2
        err = capsys.readouterr().err
        assert "--layer-decay" in err and f"'{bad}'" in err and "(0, 1]" in err


def test_cli_train_passes_layer_decay_to_the_fine_tune(tiny_bank, tmp_path, monkeypatch, capsys, one_thread):
    tiny_bank.save_pretrained(tmp_path / "bank")
    seen = []
    real = train_module.finetune

    def spy(*args, **kwargs):
        seen.append(kwargs.get("layer_decay"))
        return real(*args, **{**kwargs, "progress": False})

    monkeypatch.setattr(train_module, "finetune", spy)
    code = cli_main(["train", "--templates", str(tmp_path / "bank"), "--depth", "2", "--width", "32",
                     "--data", "digits", "--fit-steps", "0", "--train-limit", "32", "--layer-decay", "0.5",
                     "--out", str(tmp_path / "vit")])
    assert code == 0, capsys.readouterr().err
    assert seen == [0.5]
    assert (tmp_path / "vit" / "config.json").is_file()
