"""Initialization baselines (``wave_hf.baselines``): one table over every registered method, plus the
method-specific contracts (Weight Selection indices, TLEG's linear fit, WAVE's sibling units)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_common import assert_state_dicts_equal, random_images, tiny_vit_teacher
from transformers import ViTForImageClassification

from wave_hf import vit_layout
from wave_hf.baselines import (
    INIT_METHODS,
    REPORT_ORDER,
    init_model,
    linear_fit,
    train_learngene,
    uniform_indices,
)
from wave_hf.baselines.weight_selection import select_tensor

HAS_FIT = importlib.util.find_spec("wave_hf.fit") is not None
FIT = dict(steps=2, max_images=16, batch_size=8)  # a smoke-sized fitting budget for the fitting methods
OPTIONS = {"weight_selection_matched": FIT, "wave_fitted": FIT}
FITTING = tuple(OPTIONS)


@pytest.fixture(scope="module")
def teacher() -> ViTForImageClassification:
    return tiny_vit_teacher()


@pytest.fixture(scope="module")
def train_data() -> Dataset:
    return random_images(32, seed=2)


@pytest.fixture(scope="module", autouse=True)
def learngene(teacher, train_data):
    """A 32-wide TLEG learngene of the tiny teacher (two steps: the table checks contracts, not quality)."""
    gene = train_learngene(teacher, train_data, 32, num_heads=2, steps=2, batch_size=8, progress=False)
    OPTIONS["tleg_learngene"] = {"learngene": gene}
    yield gene
    del OPTIONS["tleg_learngene"]


def _build(method, depth, width, teacher, tiny_init, train_data, seed=0, **kw):
    return init_model(method, depth, width, teacher=teacher, initializer=tiny_init, train_dataset=train_data,
                      seed=seed, **{**OPTIONS.get(method, {}), **kw})


def _needs_fit(method: str) -> None:
    if method == "wave_fitted" and not HAS_FIT:
        pytest.skip("wave_hf.fit is not there yet")


def test_registry_lists_every_method_in_report_order():
    assert list(INIT_METHODS) == list(REPORT_ORDER)
    for name, entry in INIT_METHODS.items():
        assert entry.name == name and entry.description


@pytest.mark.parametrize("method", REPORT_ORDER)
def test_method_returns_stock_vit_that_loads_with_plain_transformers(method, teacher, tiny_init, train_data,
                                                                     tmp_path, images):
    _needs_fit(method)
    extra = {"distill": False} if method in FITTING else {}  # 7 labels: a task the 10-label teacher does not know
    model = _build(method, 2, 32, teacher, tiny_init, train_data, num_heads=2, num_labels=7, **extra)
    assert type(model) is ViTForImageClassification
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_labels) == (2, 32, 2, 7)
    assert c.intermediate_size == 128 and (c.image_size, c.patch_size, c.num_channels) == (28, 7, 1)
    assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in model.parameters())
    model.save_pretrained(tmp_path)
    again, info = ViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert_state_dicts_equal(model, again)
    with torch.no_grad():
        assert torch.equal(model.eval()(images).logits, again.eval()(images).logits)


@pytest.mark.parametrize("method", REPORT_ORDER)
def test_same_seed_same_bits(method, teacher, tiny_init, train_data):
    _needs_fit(method)
    a = _build(method, 2, 32, teacher, tiny_init, train_data, seed=3, num_heads=2)
    b = _build(method, 2, 32, teacher, tiny_init, train_data, seed=3, num_heads=2)
    assert_state_dicts_equal(a, b)
    c = _build(method, 2, 32, teacher, tiny_init, train_data, seed=4, num_heads=2)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match="registered methods") as err:
        init_model("weight_selektion", 2, 32)
    assert all(name in str(err.value) for name in INIT_METHODS)


def test_missing_input_names_the_argument(tiny_init):
    with pytest.raises(ValueError, match="teacher="):
        init_model("weight_selection", 2, 32, initializer=tiny_init)
    with pytest.raises(ValueError, match="train_dataset="):
        init_model("wave_fitted", 2, 32, initializer=tiny_init)
    with pytest.raises(TypeError, match="unknown options"):
        init_model("random", 2, 32, initializer=tiny_init, stepz=3)


# ------------------------------------------------------------------------------------- Weight Selection
@pytest.mark.parametrize("t, s", [(48, 32), (192, 128), (192, 64), (7, 5), (10, 3), (768, 256), (100, 99), (5, 5)])
def test_uniform_indices_in_range_increasing_and_as_specified(t, s):
    idx = uniform_indices(t, s)
    assert idx.dtype == torch.long and idx.shape == (s,)
    assert idx[0] == 0 and idx.max() <= t - 1 and bool((idx[1:] > idx[:-1]).all())
    if t % s == 0:  # the original's every-k-th branch
        assert idx.tolist() == (np.arange(s) * (t // s)).tolist()
    else:  # round(linspace(0, t-1, s)): within half a step of the exact position, last index t-1
        exact = np.arange(s) * (t - 1) / (s - 1)
        assert np.abs(idx.numpy() - exact).max() <= 0.5 + 1e-9 and idx[-1] == t - 1


def test_weight_selection_on_non_divisible_size_matches_a_plain_reference(teacher):
    """48 -> 32 (and 192 -> 128 in fc1) do not divide: checked element by element against explicit loops."""
    model = init_model("weight_selection", 2, 32, num_heads=2, teacher=teacher)
    got, src = model.state_dict(), teacher.state_dict()
    for key, target in vit_layout.tensor_shapes(vit_layout.shape_of(model.config)).items():
        full = src[key]
        per_axis = [uniform_indices(t, s).tolist() if t != s else list(range(t)) for t, s in zip(full.shape, target)]
        ref = torch.empty(target)
        for pos in np.ndindex(*target):
            ref[pos] = full[tuple(per_axis[a][i] for a, i in enumerate(pos))]
        assert torch.equal(got[key], ref), key
    # first-N layers: layer 1 of the student comes from layer 1 of the teacher, never from layer 2
    q = vit_layout.layer_key(1, "q")
    assert torch.equal(got[q], select_tensor(src[q], (32, 32)))


def test_weight_selection_at_the_teachers_size_returns_its_encoder(teacher):
    model = init_model("weight_selection", 3, 48, teacher=teacher)
    got, src = model.state_dict(), teacher.state_dict()
    for key in vit_layout.encoder_keys(3):
        assert torch.equal(got[key], src[key]), key
        assert got[key].data_ptr() != src[key].data_ptr()  # a copy: training the student leaves the teacher alone
    assert not torch.equal(got["classifier.weight"], src["classifier.weight"])  # the head is new


@pytest.mark.parametrize("method", ["weight_selection", "weight_selection_matched"])
def test_weight_selection_refuses_deeper_or_wider_than_teacher(method, teacher, train_data):
    kw = dict(teacher=teacher, train_dataset=train_data, **OPTIONS.get(method, {}))
    with pytest.raises(ValueError, match=r"deeper.*depth=4.*\[1, 3\]"):
        init_model(method, 4, 48, **kw)
    with pytest.raises(ValueError, match=r"wider.*width=64.*\[1, 48\]"):
        init_model(method, 2, 64, **kw)


def test_matched_weight_selection_trains_every_weight(teacher, train_data):
    plain = init_model("weight_selection", 2, 32, num_heads=2, teacher=teacher)
    matched = init_model("weight_selection_matched", 2, 32, num_heads=2, teacher=teacher, train_dataset=train_data,
                         **FIT)
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, matched.state_dict()[k])]
    assert vit_layout.global_key("pos") in changed and vit_layout.layer_key(1, "fc2") in changed
    assert "classifier.weight" in changed


# ------------------------------------------------------------------------------------------------ TLEG
def test_linear_fit_is_least_squares():
    stack = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base, slope = linear_fit(stack)
    design = torch.stack([torch.ones(5), torch.arange(5) / 5], 1).double()
    sol = torch.linalg.lstsq(design, stack.reshape(5, -1)).solution
    assert torch.allclose(base, sol[0].reshape(4, 3)) and torch.allclose(slope, sol[1].reshape(4, 3))


def test_tleg_at_aux_depth_reproduces_the_linear_fit_of_the_aux_model(tiny_init):
    c = tiny_init.config  # aux 3 x 48, template width 16: TLEG's own setting is r = 1
    aux_r1 = init_model("wave_default", c.aux_depth, c.template_width, initializer=tiny_init).state_dict()
    model = init_model("tleg", c.aux_depth, c.template_width, initializer=tiny_init).state_dict()
    L = c.aux_depth
    design = torch.stack([torch.ones(L), torch.arange(L) / L], 1).double()
    for name in vit_layout.layer_tensor_names():
        stack = torch.stack([aux_r1[vit_layout.layer_key(layer, name)] for layer in range(L)]).double()
        fit = design @ torch.linalg.lstsq(design, stack.reshape(L, -1)).solution
        for layer in range(L):
            got = model[vit_layout.layer_key(layer, name)].double().reshape(-1)
            assert torch.allclose(got, fit[layer], atol=1e-6), (name, layer)
    for name in vit_layout.GLOBAL_TENSORS:
        assert torch.equal(model[vit_layout.global_key(name)], aux_r1[vit_layout.global_key(name)])


def test_tleg_strict_r1_refuses_other_widths(tiny_init):
    with pytest.raises(ValueError, match=r"r = 1.*width=32.*template_width=16"):
        init_model("tleg", 2, 32, num_heads=2, initializer=tiny_init, width_expansion="none")
    model = init_model("tleg", 5, 16, initializer=tiny_init, width_expansion="none")  # any depth at r = 1
    assert model.config.num_hidden_layers == 5


# ----------------------------------------------------------------------------- WAVE sibling units (issue 8)
def _sibling_cosine(weight: torch.Tensor, r: int) -> float:
    """Mean |cosine| between rows ``a*r+p`` and ``a*r+p'`` (p < p'): the r target units of template unit a."""
    rows = torch.nn.functional.normalize(weight.reshape(-1, r, weight.shape[-1]).double(), dim=-1)
    cos = rows @ rows.transpose(1, 2)
    upper = torch.triu_indices(r, r, offset=1)
    return cos[:, upper[0], upper[1]].abs().mean().item()


@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("method", ["wave_default", "wave_fitted"])
def test_wave_sibling_units_are_not_copies(method, r, teacher, tiny_init, train_data):
    _needs_fit(method)
    width = 16 * r
    model = _build(method, 2, width, teacher, tiny_init, train_data, num_heads=r)
    state = model.state_dict()
    for layer in range(2):
        for name in ("fc1", "q"):
            cos = _sibling_cosine(state[vit_layout.layer_key(layer, name)], r)
            assert cos < 0.5, (name, layer, cos)
    # the reference point this guards against: a rank-one v kron 1_r expansion gives exactly 1
    copies = torch.kron(torch.randn(8, 16), torch.ones(r, 1))
    assert _sibling_cosine(copies, r) == pytest.approx(1.0)
