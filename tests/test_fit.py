"""Stage 2 (``wave_hf.fit``): only the scalers train, folding is exact, resume and seeds are bit-exact,
bad inputs raise, and ``accelerate launch`` on 2 processes matches 1 process."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from _accelerate_fit_script import FIT, accelerate_launch, tiny_setup
from testing_common import assert_state_dicts_equal

from wave_hf import Scalers, WaveInitializer, fold
from wave_hf.fit import _fit, fit_model, fit_scalers

HERE = Path(__file__).resolve().parent
KW = dict(steps=5, batch_size=8, max_images=24, lr=1e-2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture
def setup() -> tuple[WaveInitializer, datasets.Dataset]:
    return tiny_setup()


def labelled(n: int, num_labels: int, seed: int = 0, class_label: bool = True) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, num_labels, (n,), generator=g)
    features = datasets.Features({
        "pixel_values": datasets.Array3D((1, 28, 28), "float32"),
        "labels": datasets.ClassLabel(num_classes=num_labels) if class_label else datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.tolist()},
                                      features=features).with_format("torch")


def test_fit_changes_only_the_scalers(setup):
    init, data = setup
    before = {k: v.clone() for k, v in init.bank.state_dict().items()}
    start = init.scalers_for(2, 32)
    scalers = fit_scalers(init, 2, 32, data, num_labels=4, **KW)
    assert_state_dicts_equal(before, init.bank.state_dict())  # templates and auxiliary scalers: bit-identical
    assert isinstance(scalers, Scalers) and (scalers.depth, scalers.width) == (2, 32)
    assert not any(p.requires_grad for p in scalers.parameters())
    for group in ("matrix", "vector_scalers", "vectors"):
        # the key bias gets no gradient: softmax is invariant to adding q.b_k to every logit of a row
        moved = {k: not torch.equal(getattr(scalers, group)[k], getattr(start, group)[k])
                 for k in getattr(scalers, group) if k != "k_bias"}
        assert all(moved.values()), (group, moved)


def test_train_vectors_false_keeps_vector_templates(setup):
    init, data = setup
    start = init.scalers_for(2, 32)
    scalers = fit_scalers(init, 2, 32, data, num_labels=4, train_vectors=False, **KW)
    for k in scalers.vectors:
        assert torch.equal(scalers.vectors[k], start.vectors[k])
    assert not torch.equal(scalers.matrix["qkv"], start.matrix["qkv"])


def test_fit_lowers_the_loss(setup):
    init, data = setup
    model, log = _fit(init, 2, 32, data, num_heads=None, num_labels=4, id2label=None, teacher=None, max_images=16,
                      steps=30, batch_size=16, lr=1e-2, vectors_lr=None, kd_weight=0.0, temperature=1.0, train_vectors=True,
                      lowrank_rank=0, warmup_ratio=0.0, seed=0, output_dir=None, checkpoint_every=0, max_steps=None,
                      progress=False)
    assert sum(log.losses[-5:]) < sum(log.losses[:5])


def test_folded_fitted_model_equals_the_parametrized_one(setup):
    init, data = setup
    model, _ = _fit(init, 2, 32, data, num_heads=None, num_labels=4, id2label=None, teacher=None, max_images=24,
                    steps=3, batch_size=8, lr=1e-2, vectors_lr=None, kd_weight=0.0, temperature=1.0, train_vectors=True,
                    lowrank_rank=0, warmup_ratio=0.0, seed=0, output_dir=None, checkpoint_every=0, max_steps=None,
                    progress=False)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(x).logits
        after = fold(model)(x).logits
    assert (before - after).abs().max().item() < 1e-6
    # fit_model returns that folded model; build(scalers=fit_scalers(...)) has the same encoder
    folded = fit_model(init, 2, 32, data, num_labels=4, **{**KW, "steps": 3})
    built = init.build(2, 32, num_labels=4, scalers=fit_scalers(init, 2, 32, data, num_labels=4,
                                                                  **{**KW, "steps": 3}))
    fs, bs = folded.state_dict(), built.state_dict()
    for key in fs:
        if not key.startswith("classifier"):
            assert (fs[key] - bs[key]).abs().max().item() < 1e-6, key
    assert all(p.requires_grad for p in folded.parameters())


def test_resume_is_bit_identical_and_seeded(setup, tmp_path):
    init, data = setup
    kw = dict(num_labels=4, checkpoint_every=2, **KW)
    full = fit_scalers(init, 2, 32, data, output_dir=tmp_path / "full", **kw)
    fit_scalers(init, 2, 32, data, output_dir=tmp_path / "cut", max_steps=3, **kw)
    resumed = fit_scalers(init, 2, 32, data, output_dir=tmp_path / "cut", **kw)
    assert_state_dicts_equal(full, resumed)
    assert_state_dicts_equal(full, fit_scalers(init, 2, 32, data, **kw))
    assert not torch.equal(full.matrix["o"], fit_scalers(init, 2, 32, data, **{**kw, "seed": 1}).matrix["o"])


def test_kd_teacher_and_labels_from_features(setup):
    init, _ = setup
    data = labelled(24, 3)
    teacher = init.build(3, 48, num_labels=3, seed=7)
    model = fit_model(init, 2, 32, data, teacher=teacher, kd_weight=1.0, **KW)
    assert model.config.num_labels == 3  # from the ClassLabel feature
    plain = fit_model(init, 2, 32, data, **KW)
    assert not torch.equal(model.classifier.weight, plain.classifier.weight)  # the KD term changed the fit


def test_initializer_keeps_fitted_scalers(setup):
    init, data = setup
    scalers = init.fit_scalers(2, 32, data, num_labels=4, **KW)
    assert init.scalers_for(2, 32) is scalers
    a = init.build(2, 32, num_labels=4).state_dict()
    b = init.build(2, 32, num_labels=4, scalers=scalers).state_dict()
    assert_state_dicts_equal(a, b)


def test_lowrank_fit_trains_the_factors_and_round_trips(setup, tmp_path):
    """``lowrank_rank=2``: A and B train with the scalers, templates stay bit-identical, the factors are
    counted, saved with the scalers and added by ``build`` after ``from_pretrained``."""
    init, data = setup
    before = {k: v.clone() for k, v in init.bank.state_dict().items()}
    start = init.scalers_for(2, 32, lowrank_rank=2)  # the start the fit uses (same seed)
    scalers = fit_scalers(init, 2, 32, data, num_labels=4, lowrank_rank=2, **KW)
    assert_state_dicts_equal(before, init.bank.state_dict())
    assert scalers.lowrank_rank == 2
    for group in ("lowrank_a", "lowrank_b"):
        moved = {k: not torch.equal(getattr(scalers, group)[k], getattr(start, group)[k])
                 for k in getattr(scalers, group)}
        assert all(moved.values()), (group, moved)
    plain = sum(p.numel() for p in init.scalers_for(2, 32).parameters())
    extra = 2 * 2 * (4 * (32 + 32) + 2 * (128 + 32))  # layers * rank * (q, k, v, o + fc1, fc2) * (out + in)
    assert sum(p.numel() for p in scalers.parameters()) == plain + extra
    init.add_scalers(scalers)
    init.save_pretrained(tmp_path / "bank")
    again = WaveInitializer.from_pretrained(tmp_path / "bank")
    assert_state_dicts_equal(scalers, again.fitted[(2, 32, 2)])
    assert_state_dicts_equal(init.build(2, 32, num_labels=4, scalers=scalers), again.build(2, 32, num_labels=4))


def test_bad_inputs_raise_clear_errors(setup):
    init, data = setup
    with pytest.raises(ValueError, match="empty"):
        fit_scalers(init, 2, 32, data.select([]), num_labels=4, **KW)
    no_labels = datasets.Dataset.from_dict({"pixel_values": torch.zeros(4, 1, 28, 28).numpy()}).with_format("torch")
    with pytest.raises(ValueError, match="labels"):
        fit_scalers(init, 2, 32, no_labels, **KW)
    with pytest.raises(ValueError, match=r"label 3, outside the accepted range \[0, 2\]"):
        fit_scalers(init, 2, 32, labelled(24, 4, class_label=False), num_labels=3, **{**KW, "max_images": None})
    with pytest.raises(ValueError, match="max_images must be >= 1, got 0"):
        fit_scalers(init, 2, 32, data, num_labels=4, **{**KW, "max_images": 0})
    with pytest.raises(ValueError, match="width=40 must be a positive multiple"):
        fit_scalers(init, 2, 40, data, num_labels=4, **KW)
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0.*got -1.0"):
        fit_scalers(init, 2, 32, data, num_labels=4, **{**KW, "lr": -1.0})
    with pytest.raises(ValueError, match="teacher predicts 4 labels"):  # "auto" would teach by features
        fit_scalers(init, 2, 32, labelled(8, 3), teacher=init.build(3, 48, num_labels=4), teacher_head="logits",
                    **KW)
    with pytest.raises(TypeError, match="WaveInitializer"):
        fit_scalers(init.bank, 2, 32, data, **KW)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed has no gloo backend on this machine")
def test_two_processes_match_one(setup, tmp_path):
    """``accelerate launch`` on 2 CPU processes splits each global batch; DDP averages the gradients.

    Launched through the running interpreter (``accelerate_launch``), so it runs wherever gloo does, and the
    script reports the world it trained in: 2 processes, not 2 independent single-process runs.
    """
    out = tmp_path / "two.safetensors"
    res = accelerate_launch(HERE / "_accelerate_fit_script.py", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(out.with_suffix(".json").read_text()) == {"num_processes": 2, "torch_world_size": 2}
    init, data = setup
    one = fit_scalers(init, 2, 32, data, num_labels=4, **FIT)
    two = Scalers.load(out, init.config)
    diff = max((a - b).abs().max().item() for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    assert diff < 1e-5


def test_fit_config_is_one_object_stored_with_the_scalers(setup, tmp_path):
    import json

    from wave_hf.fit import FitConfig

    init, data = setup
    config = FitConfig(steps=3, batch_size=8, max_images=16, lowrank_rank=2)
    assert FitConfig(**json.loads(json.dumps(config.to_dict()))) == config  # round-trips through JSON
    scalers = init.fit_scalers(2, 32, data, config, num_labels=4, progress=False)
    assert scalers.fit_config == config.to_dict()
    init.save_pretrained(tmp_path / "bank")
    again = WaveInitializer.from_pretrained(tmp_path / "bank").fitted[(2, 32, scalers.num_heads)]
    assert again.fit_config == config.to_dict()
    # keywords override the object; a typo is named with the accepted fields
    assert init.fit_scalers(2, 32, data, config, steps=2, num_labels=4, progress=False).fit_config["steps"] == 2
    with pytest.raises(TypeError, match=r"unknown options \['stepz'\]"):
        init.fit_scalers(2, 32, data, config, stepz=2, num_labels=4)
    with pytest.raises(ValueError, match="lowrank_rank must be >= 0, got -1"):
        FitConfig(lowrank_rank=-1)
