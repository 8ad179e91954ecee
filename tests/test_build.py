"""``build`` / ``parametrize`` / ``fold``: shapes, exactness, stock-transformers loading, determinism."""

from __future__ import annotations

import pytest
import torch
from testing_common import assert_state_dicts_equal, load_in_fresh_python
from transformers import ViTConfig, ViTForImageClassification

from wave_hf import Scalers, TemplateBank, WaveInitializer, fold, vit_layout
from wave_hf.rule import assemble

# (name, size): r = width / 16 on the tiny bank (aux width 48 -> r_aux = 3): crop, equal and pad paths.
SIZES = [
    ("r1-shallow", dict(depth=1, width=16)),
    ("r2", dict(depth=2, width=32, num_heads=2)),
    ("r3-aux-size", dict(depth=3, width=48)),
    ("r4-wider-than-aux", dict(depth=5, width=64)),
]


@pytest.mark.parametrize("name, size", SIZES)
def test_build_shapes_match_vit_config(name, size, tiny_init):
    model = tiny_init.build(**size, num_labels=7)
    assert type(model) is ViTForImageClassification
    heads = size.get("num_heads", size["width"] // 16)
    ref = ViTConfig(hidden_size=size["width"], num_hidden_layers=size["depth"], num_attention_heads=heads,
                    intermediate_size=4 * size["width"], image_size=28, patch_size=7, num_channels=1,
                    num_labels=7)
    with torch.device("meta"):
        ref_model = ViTForImageClassification(ref)
    got = {k: v.shape for k, v in model.state_dict().items()}
    assert got == {k: v.shape for k, v in ref_model.state_dict().items()}
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name, size", SIZES)
def test_parametrized_forward_equals_folded(name, size, tiny_init, images):
    model = tiny_init.parametrize(**size)
    with torch.no_grad():  # random scalers so the check is not trivially about the default init
        for p in model.wave_source.scalers.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        before = model(images).logits
    folded = fold(model)
    assert type(folded) is ViTForImageClassification and not hasattr(folded, "wave_source")
    with torch.no_grad():
        after = folded(images).logits
    assert (before - after).abs().max() <= 1e-6
    assert all(p.requires_grad for p in folded.parameters())


def test_build_equals_parametrize_then_fold(tiny_init):
    built = tiny_init.build(depth=2, width=32, seed=5)
    folded = fold(tiny_init.parametrize(depth=2, width=32, seed=5))
    assert_state_dicts_equal(built, folded)


def test_only_scalers_and_head_train(tiny_init, images):
    model = tiny_init.parametrize(depth=2, width=32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("wave_source.scalers.", "classifier.")) for n in trainable)
    model(images).logits.sum().backward()
    assert model.wave_source.scalers.matrix["qkv"].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.wave_source.templates.values())


def test_aux_size_reproduces_the_auxiliary_model(tiny_bank):
    init = WaveInitializer(tiny_bank)
    model = init.build(depth=3, width=48)
    aux = tiny_bank()  # the auxiliary model's tensors, from the bank's own scalers
    for key, value in aux.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_narrower_target_is_a_unit_selection_of_the_aux_model(tiny_bank):
    """With r <= r_aux the default scalers crop: target unit a*r+p is aux unit a*r_aux+p."""
    init = WaveInitializer(tiny_bank)
    narrow = init.build(depth=3, width=32, num_heads=2).state_dict()
    aux = tiny_bank()
    units = torch.tensor([a * 3 + p for a in range(16) for p in range(2)])
    key = vit_layout.layer_key(1, "fc2")
    hidden = torch.tensor([a * 3 + p for a in range(64) for p in range(2)])
    assert torch.equal(narrow[key], aux[key][units][:, hidden])


def test_saved_model_loads_with_plain_transformers(tiny_init, images, tmp_path):
    model = tiny_init.build(depth=2, width=32, num_heads=2, id2label={0: "cat", 1: "dog", 2: "eel"})
    model.save_pretrained(tmp_path / "vit")
    with torch.no_grad():
        expected = model(images).logits
    report = load_in_fresh_python(tmp_path / "vit", images, tmp_path)
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["wave_hf_imported"] is False
    assert torch.equal(report["logits"], expected)
    again = ViTForImageClassification.from_pretrained(tmp_path / "vit")
    assert again.config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    assert not (tmp_path / "vit" / "adapter_config.json").exists()


def test_same_seed_same_bits(tiny_bank):
    a = WaveInitializer(tiny_bank).build(depth=4, width=64, seed=1)  # pads scalers: uses the seed
    b = WaveInitializer(tiny_bank).build(depth=4, width=64, seed=1)
    c = WaveInitializer(tiny_bank).build(depth=4, width=64, seed=2)
    assert_state_dicts_equal(a, b)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    torch.manual_seed(0)
    bank_a = TemplateBank(tiny_bank.config)
    torch.manual_seed(0)
    bank_b = TemplateBank(tiny_bank.config)
    assert_state_dicts_equal(bank_a, bank_b)


def test_fitted_scalers_are_used_and_round_trip(tiny_init, tmp_path):
    scalers = tiny_init.scalers_for(2, 32, num_heads=2)
    with torch.no_grad():
        scalers.matrix["o"].mul_(2.0)
    scalers.save(tmp_path / "s.safetensors")
    loaded = Scalers.load(tmp_path / "s.safetensors", tiny_init.config)
    assert_state_dicts_equal(scalers, loaded)
    built = tiny_init.build(depth=2, width=32, num_heads=2, scalers=loaded)
    expected = assemble(tiny_init.config, tiny_init.bank.templates, scalers)
    key = vit_layout.layer_key(0, "o")
    assert torch.equal(built.state_dict()[key], expected[key])
    tiny_init.add_scalers(loaded)
    tiny_init.save_pretrained(tmp_path / "bank")
    assert (tmp_path / "bank" / Scalers.filename(2, 32, 2)).is_file()
    again = WaveInitializer.from_pretrained(tmp_path / "bank")
    assert (2, 32, 2) in again.fitted
    assert torch.equal(again.build(depth=2, width=32, num_heads=2).state_dict()[key], expected[key])


def test_build_is_fast_no_full_random_init(tiny_init, monkeypatch):
    """Nothing in the encoder is randomly initialized and then overwritten."""
    calls = []
    orig = torch.nn.init.trunc_normal_
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", lambda t, *a, **k: calls.append(t.shape) or orig(t, *a, **k))
    tiny_init.build(depth=3, width=48, num_labels=4)
    assert calls == [torch.Size([4, 48])]  # the new classifier head only


@pytest.mark.parametrize("name, size", SIZES)
def test_lowrank_rank_zero_is_todays_model(name, size, tiny_init):
    """``lowrank_rank=0`` (the default) adds nothing: same bits, same parameters; a new rank-2 correction
    starts at an exactly-zero product, so it does not change the built weights either."""
    today = tiny_init.build(**size)
    assert_state_dicts_equal(today, tiny_init.build(**size, lowrank_rank=0))
    assert_state_dicts_equal(today, tiny_init.build(**size, lowrank_rank=2))
    plain = tiny_init.parametrize(**size, lowrank_rank=0).wave_source.scalers
    assert plain.lowrank_rank == 0 and not any(k.startswith("lowrank") for k in plain.state_dict())
    lowrank = tiny_init.parametrize(**size, lowrank_rank=2).wave_source.scalers
    assert all(not a.any() and b.any() for a, b in zip(lowrank.lowrank_a.values(), lowrank.lowrank_b.values()))
    again = tiny_init.parametrize(**size, lowrank_rank=2).wave_source.scalers  # same seed -> same bits
    assert_state_dicts_equal(lowrank, again)


def _reference_weight(init: WaveInitializer, scalers: Scalers, layer: int, name: str) -> torch.Tensor:
    """``sum_t kron(T_t, S_{l,t}) + A_l @ B_l`` in plain torch (``torch.kron``), q/k/v sliced from qkv."""
    a = init.config.template_width
    kind, row = {"q": ("qkv", 0), "k": ("qkv", 1), "v": ("qkv", 2)}.get(name, (name, None))
    t = init.bank.templates[kind] if row is None else init.bank.templates[kind][:, row * a : (row + 1) * a]
    s = scalers.matrix[kind][layer]
    rule = sum(torch.kron(t[i], s[i]) for i in range(t.shape[0]))
    return rule + scalers.lowrank_a[name][layer] @ scalers.lowrank_b[name][layer]


# (name, size, rank, layer, matrix checked against the plain-torch reference)
LOWRANK_CASES = [
    ("r1-full-rank-fc1", dict(depth=1, width=16), 16, 0, "fc1"),
    ("r2-rank2-o", dict(depth=2, width=32, num_heads=2), 2, 1, "o"),
    ("r3-rank3-k", dict(depth=3, width=48), 3, 2, "k"),
]


@pytest.mark.parametrize("name, size, rank, layer, matrix", LOWRANK_CASES)
def test_lowrank_correction_folds_exactly(name, size, rank, layer, matrix, tiny_init, images):
    model = tiny_init.parametrize(**size, lowrank_rank=rank)
    scalers = model.wave_source.scalers
    with torch.no_grad():  # non-zero products: the start (A = 0) would make the check trivial
        for a in scalers.lowrank_a.values():
            a.copy_(0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(4)))
        before = model(images).logits
    kept = Scalers(tiny_init.config, scalers.depth, scalers.width, scalers.num_heads, rank)
    kept.load_state_dict(scalers.state_dict())
    folded = fold(model)
    with torch.no_grad():
        after = folded(images).logits
    assert (before - after).abs().max() <= 1e-5
    key = vit_layout.layer_key(layer, matrix)
    expected = _reference_weight(tiny_init, kept, layer, matrix).detach()
    assert (folded.state_dict()[key] - expected).abs().max() <= 1e-6
    assert_state_dicts_equal(tiny_init.build(**size, scalers=kept), folded)  # build adds the correction too
