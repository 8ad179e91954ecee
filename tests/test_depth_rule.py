"""Issue 17, items 1 and 2: the depth rule of a start at a new depth (``relative``, ``first``, ``even``) and the
two-phase fit (``head_probe_steps``), through every door users reach them by: ``Scalers.from_source``,
``WaveInitializer.build``, ``init_model``, ``FitConfig`` / ``fit_scalers`` and ``wave-hf fit``."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from testing_common import assert_state_dicts_equal

from wave_hf import Scalers, vit_layout
from wave_hf.baselines import init_model, uniform_indices
from wave_hf.cli import main
from wave_hf.fit import FitConfig, fit_scalers
from wave_hf.kronecker import interpolate_depth
from wave_hf.scalers import DEFAULT_DEPTH_RULE, DEPTH_RULES, MATRIX_TYPES, depth_indices

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

AUX_DEPTH, AUX_WIDTH = 3, 48  # conftest.TINY: the auxiliary model is 3 x 48 (3 heads)
FIT = dict(steps=2, batch_size=8, max_images=16, lr=1e-2, num_labels=4, progress=False)


@pytest.fixture
def data() -> datasets.Dataset:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 4, (16,), generator=g)
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.tolist()}).with_format("torch")


def layer_tensors(model, layer: int) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {name: state[vit_layout.layer_key(layer, name)] for name in vit_layout.layer_tensor_names()}


def global_tensors(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {name: state[vit_layout.global_key(name)] for name in vit_layout.GLOBAL_TENSORS}


def assert_layers_are(model, full, picks: list[int]) -> None:
    """Layer ``l`` of ``model`` is layer ``picks[l]`` of ``full`` bit for bit, and so is everything global."""
    assert model.config.num_hidden_layers == len(picks)
    assert_state_dicts_equal(global_tensors(model), global_tensors(full))
    for layer, source in enumerate(picks):
        assert_state_dicts_equal(layer_tensors(model, layer), layer_tensors(full, source))


@pytest.fixture
def aux_model(tiny_init):
    """The auxiliary model itself: built at its own depth and width every rule is the identity."""
    return tiny_init.build(AUX_DEPTH, AUX_WIDTH)


# ------------------------------------------------------------------------------------------ (a) first
@pytest.mark.parametrize("depth", [1, 2])
def test_first_is_the_auxiliary_models_first_layers(tiny_init, aux_model, depth):
    model = tiny_init.build(depth, AUX_WIDTH, depth_rule="first")
    assert_layers_are(model, aux_model, list(range(depth)))


def test_first_deeper_than_the_auxiliary_model_repeats_its_last_layer(tiny_init, aux_model):
    assert depth_indices(AUX_DEPTH, 5, "first") == [0, 1, 2, 2, 2]
    assert_layers_are(tiny_init.build(5, AUX_WIDTH, depth_rule="first"), aux_model, [0, 1, 2, 2, 2])


# ------------------------------------------------------------------------------------------- (b) even
def test_even_picks_are_weight_selections_uniform_indices():
    for source in range(1, 14):
        for depth in range(1, source + 1):
            assert depth_indices(source, depth, "even") == uniform_indices(source, depth).tolist(), (source, depth)
    assert depth_indices(12, 6, "even") == [0, 2, 4, 6, 8, 10]  # every 2nd layer, as Weight Selection
    assert depth_indices(12, 5, "even") == [0, 3, 6, 8, 11]  # rounded grid from the first to the last layer
    # deeper than the source: every source layer, each repeated, in order
    assert depth_indices(3, 6, "even") == [0, 0, 1, 1, 2, 2]
    assert depth_indices(3, 5, "even") == [0, 0, 1, 2, 2]


def test_even_builds_the_picked_auxiliary_layers(tiny_init, aux_model):
    assert_layers_are(tiny_init.build(2, AUX_WIDTH, depth_rule="even"), aux_model, [0, 2])
    assert_layers_are(tiny_init.build(6, AUX_WIDTH, depth_rule="even"), aux_model, [0, 0, 1, 1, 2, 2])


def test_every_rule_is_the_identity_at_the_auxiliary_depth(tiny_init, aux_model):
    for rule in DEPTH_RULES:
        assert_state_dicts_equal(tiny_init.build(AUX_DEPTH, AUX_WIDTH, depth_rule=rule), aux_model)


# ----------------------------------------------------------------------------- (c) the default, relative
def test_even_is_the_default_and_relative_is_unchanged(tiny_init):
    assert DEFAULT_DEPTH_RULE == "even"  # chosen on validation: benchmarks/results/init_ablation.md
    assert_state_dicts_equal(tiny_init.build(2, 32, seed=3), tiny_init.build(2, 32, seed=3, depth_rule="even"))
    aux = tiny_init.bank.aux
    relative = Scalers.from_source(tiny_init.config, aux, 2, AUX_WIDTH, depth_rule="relative")
    for t in MATRIX_TYPES:  # the resample of docs/wave.md (no padding at the auxiliary width)
        assert torch.equal(relative.matrix[t], interpolate_depth(aux.matrix[t], 2))
    for depth, width in ((2, AUX_WIDTH), (2, 32), (5, 64)):  # crop and pad draw the same numbers too
        assert_state_dicts_equal(tiny_init.build(depth, width, seed=3, depth_rule="even"),
                                 tiny_init.build(depth, width, seed=3))
    assert_state_dicts_equal(init_model("wave_default", 2, 32, initializer=tiny_init),
                             init_model("wave_default", 2, 32, initializer=tiny_init, depth_rule="even"))


def test_rules_differ_at_a_new_depth_and_reach_wave_default(tiny_init):
    built = {rule: tiny_init.build(2, 32, depth_rule=rule) for rule in DEPTH_RULES}
    key = vit_layout.layer_key(1, "q")
    assert not torch.equal(built["first"].state_dict()[key], built["even"].state_dict()[key])
    assert not torch.equal(built["first"].state_dict()[key], built["relative"].state_dict()[key])
    assert_state_dicts_equal(init_model("wave_default", 2, 32, initializer=tiny_init, depth_rule="first"),
                             built["first"])


def test_fitted_scalers_are_kept_whatever_the_rule(tiny_init):
    fitted = tiny_init.scalers_for(2, 32, seed=5)
    tiny_init.add_scalers(fitted)
    assert tiny_init.scalers_for(2, 32, depth_rule="first") is fitted


# ------------------------------------------------------------------------------------------ (d) errors
@pytest.mark.parametrize("bad", ["First", "uniform", "", None, 1])
def test_a_bad_rule_is_named_with_the_accepted_ones(tiny_init, data, bad, monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("allocated before the rule was checked")

    pattern = rf"depth_rule must be one of \['relative', 'first', 'even'\], got {bad!r}"
    monkeypatch.setattr("wave_hf.scalers.Scalers.num_elements", refuse)  # every Scalers(...) starts with it
    for call in (
        lambda: tiny_init.build(2, 32, depth_rule=bad),
        lambda: tiny_init.scalers_for(2, 32, depth_rule=bad),
        lambda: Scalers.from_source(tiny_init.config, tiny_init.bank.aux, 2, 32, depth_rule=bad),
        lambda: FitConfig(depth_rule=bad),
        lambda: fit_scalers(tiny_init, 2, 32, data, depth_rule=bad, **FIT),
        lambda: init_model("wave_default", 2, 32, initializer=tiny_init, depth_rule=bad),
    ):
        with pytest.raises(ValueError, match=pattern):
            call()


def test_a_bad_head_probe_step_count_is_named(tiny_init, data):
    with pytest.raises(ValueError, match=r"head_probe_steps must be >= 0, got -1"):
        FitConfig(head_probe_steps=-1)
    with pytest.raises(TypeError, match=r"head_probe_steps must be an int, got 1.5"):
        fit_scalers(tiny_init, 2, 32, data, head_probe_steps=1.5, **FIT)


# ------------------------------------------------------------------------------------ (e) head probe
def test_the_head_probe_trains_only_the_head_then_the_fit_goes_on(tiny_init, data, monkeypatch):
    """The first loop (the probe) changes only classifier parameters; the second (the scaler fit) starts from
    exactly where the probe stopped and runs the configured steps."""
    import wave_hf.fit as fit_module

    calls: list[tuple[int, dict, dict]] = []
    real_run_loop = fit_module.run_loop

    def spy(model, groups, batches, loss_fn, settings, **kw):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = real_run_loop(model, groups, batches, loss_fn, settings, **kw)
        calls.append((settings.steps, before, {k: v.detach().clone() for k, v in out[0].state_dict().items()}))
        return out

    monkeypatch.setattr(fit_module, "run_loop", spy)
    fit_scalers(tiny_init, 2, 32, data, head_probe_steps=3, **FIT)
    (probe_steps, start, probed), (fit_steps, resumed, _) = calls
    assert (probe_steps, fit_steps) == (3, FIT["steps"])
    head = [k for k in start if k.startswith(vit_layout.CLASSIFIER + ".")]
    assert head and all(not torch.equal(start[k], probed[k]) for k in head)
    assert_state_dicts_equal({k: v for k, v in start.items() if k not in head},
                             {k: v for k, v in probed.items() if k not in head})
    assert_state_dicts_equal(probed, resumed)


def test_a_fit_with_a_head_probe_is_deterministic_and_recorded(tiny_init, data):
    a = fit_scalers(tiny_init, 2, 32, data, head_probe_steps=2, depth_rule="first", seed=1, **FIT)
    b = fit_scalers(tiny_init, 2, 32, data, head_probe_steps=2, depth_rule="first", seed=1, **FIT)
    assert_state_dicts_equal(a, b)
    plain = fit_scalers(tiny_init, 2, 32, data, depth_rule="first", seed=1, **FIT)
    assert not torch.equal(a.matrix["qkv"], plain.matrix["qkv"])  # the probed head changed the scaler fit
    assert (a.fit_config["head_probe_steps"], a.fit_config["depth_rule"]) == (2, "first")
    assert (plain.fit_config["head_probe_steps"], plain.fit_config["depth_rule"]) == (0, "first")


def test_wave_fitted_takes_both_options(tiny_init, data):
    kw = dict(initializer=tiny_init, train_dataset=data, num_labels=4, distill=False, steps=1, batch_size=8,
              max_images=16)
    a = init_model("wave_fitted", 2, 32, depth_rule="even", head_probe_steps=1, **kw)
    b = init_model("wave_fitted", 2, 32, depth_rule="even", head_probe_steps=1, **kw)
    assert_state_dicts_equal(a, b)


# ------------------------------------------------------------------------------------------- (f) CLI
@pytest.fixture
def bank_dir(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    return tmp_path / "bank"


def fit_argv(bank_dir, out, *extra: str) -> list[str]:
    return ["--json", "fit", "--templates", str(bank_dir), "--depth", "2", "--width", "32", "--num-heads", "2",
            "--data", "digits", "--max-images", "16", "--batch-size", "8", "--steps", "1", *extra, "--out", str(out)]


def test_cli_fit_takes_the_depth_rule_and_the_head_probe(bank_dir, tmp_path, capsys):
    from wave_hf import WaveInitializer

    out = tmp_path / "fitted"
    assert main(fit_argv(bank_dir, out, "--depth-rule", "first", "--head-probe-steps", "2")) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["depth_rule"], config["head_probe_steps"]) == ("first", 2)
    stored = WaveInitializer.from_pretrained(out).scalers_for(2, 32, 2).fit_config
    assert (stored["depth_rule"], stored["head_probe_steps"]) == ("first", 2)


def test_cli_fit_refuses_a_bad_depth_rule_in_one_line(bank_dir, tmp_path, capsys):
    out = tmp_path / "fitted"
    assert main(fit_argv(bank_dir, out, "--depth-rule", "magic")[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--depth-rule" in err[0] and "'magic'" in err[0] and "'first'" in err[0]
    assert not out.exists()
