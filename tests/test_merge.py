"""FS-Merge and the merge baselines on tiny ViTs (depth 2, width 32, 2 heads, patch 7, 28x28x1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from wave_hf import vit_layout as L
from wave_hf.merge import MERGE_METHODS, EnsembleViT, MergedViT, merge
from wave_hf.merge.common import average_states, encoder_state
from wave_hf.merge.permute import permute_state
from wave_hf.merge.supernet import SuperNet

TASKS3 = ["fashion", "digits", "shifted"]
TRAIN_KW = dict(steps=4, batch_size=16, progress=False)
# method -> extra options for a fast end-to-end run
METHOD_CASES = [
    ("fs_merge", dict(TRAIN_KW, rank=2)),
    ("fs_merge", dict(TRAIN_KW, rank=0, init="average")),
    ("average", {}),
    ("permute", {}),
    ("regmean", {}),
    ("kd", dict(TRAIN_KW)),
    ("ensemble", {}),
]


def tiny_vit(seed: int, num_labels: int = 3, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=28,
               patch_size=7, num_channels=1, num_labels=num_labels)
    cfg.update(overrides)
    model = ViTForImageClassification(ViTConfig(**cfg)).eval()
    model.config._name_or_path = f"tiny/vit-{seed}"
    with torch.no_grad():  # non-trivial LayerNorms and biases, so that folding mistakes show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_vits(n: int) -> list[ViTForImageClassification]:
    """The merge tests' sources: ``n`` tiny ViTs, each from its own init, with 3, 4, ... labels."""
    return [tiny_vit(i, num_labels=3 + i) for i in range(n)]


def noise_images(n_sets: int, count: int, *, clamp: bool = False) -> list[torch.Tensor]:
    """``n_sets`` seeded batches of ``count`` grey 28x28 images (clamped to the pixel range if asked)."""
    g = torch.Generator().manual_seed(0)
    sets = [torch.randn(count, 1, 28, 28, generator=g) for _ in range(n_sets)]
    return [x.clamp(-1, 1) for x in sets] if clamp else sets


@pytest.fixture(scope="module")
def models3():
    return tiny_vits(3)


@pytest.fixture(scope="module")
def data3():
    return noise_images(3, 24)


@pytest.fixture
def pixels():
    return torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(7))


def randomize_(net: SuperNet, scale: float = 0.3) -> SuperNet:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


# --- folding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("rank, init", [(4, "first"), (2, "average"), (0, "first")])
def test_supernet_and_folded_model_agree(models3, pixels, n, rank, init):
    tasks = TASKS3[:n]
    net = randomize_(SuperNet(models3[:n], tasks, rank=rank, init=init))
    assert all(m.a is None for m in net.modules() if hasattr(m, "a") and hasattr(m, "diag")) == (rank == 0)
    merged = net.fold()
    for i, task in enumerate(tasks):
        with torch.no_grad():
            w, b = net.head(i)  # the reference runs the N per-model streams, not the fold
            ref = net.u_task(net.streamed_tokens(pixels)[:, 0])[:, i] @ w.T + b
            out = merged.for_task(task)(pixel_values=pixels).logits
        assert out.shape == (5, 3 + i)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(net.logits(pixels, i).detach(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n, rank", [(2, 4), (3, 0), (3, 2)])
def test_folded_training_forward_matches_the_per_model_streams(models3, pixels, n, rank):
    """The SuperNet trains through its fold (one stock ViT forward): same feature and same gradients as the
    N factored per-model streams, for every trainable tensor."""
    net = randomize_(SuperNet(models3[:n], TASKS3[:n], rank=rank, init="first"), scale=0.05)
    params = [p for p in net.parameters() if p.requires_grad]
    fast, ref = net.merged_tokens(pixels), net.streamed_tokens(pixels)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=0)
    g_fast = torch.autograd.grad(fast.square().mean(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.square().mean(), params, allow_unused=True)
    names = [name for name, p in net.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_fast, g_ref):
        assert (a is None) == (b is None) == name.startswith("u_task."), name  # u_task acts after the stream
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


def test_first_init_folds_to_model_1(models3, pixels):
    merged = SuperNet(models3, TASKS3, rank=4, init="first").fold()
    ref = encoder_state(models3[0])
    for k, v in ref.items():
        assert torch.equal(merged.encoder_state[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(merged.for_task("fashion")(pixel_values=pixels).logits,
                                   models3[0](pixel_values=pixels).logits, atol=0, rtol=0)


@pytest.mark.parametrize("n", [2, 3])
def test_average_init_folds_to_weight_average(models3, n):
    merged = SuperNet(models3[:n], TASKS3[:n], rank=4, init="average").fold()
    ref = average_states([encoder_state(m) for m in models3[:n]])
    for k, v in ref.items():
        torch.testing.assert_close(merged.encoder_state[k], v, atol=1e-7, rtol=0)


def test_maps_are_factored(models3):
    """No dense (N*e x e) parameter: the largest trainable tensor is a diagonal or a rank-r factor."""
    net = SuperNet(models3, TASKS3, rank=2)
    d, h = 32, 128
    for name, p in net.named_parameters():
        assert p.numel() <= 3 * h * 4 * 2, (name, p.shape)  # N*h x 4r at most
    assert net.blocks[0].m_fc1.rank == 2 * h // d


# --- save / load with plain transformers ---------------------------------------------------------------
def test_save_reload_with_plain_transformers(models3, data3, pixels, tmp_path):
    merged = merge(models3[:2], TASKS3[:2], "fs_merge", train_datasets=data3[:2], images_per_task=8,
                   augment_copies=1, rank=2, **TRAIN_KW)
    out = merged.save_pretrained(tmp_path / "merged", accuracies={"fashion": 0.5})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "digits", "fashion", "merge_config.json"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind
    cfg = json.loads((out / "merge_config.json").read_text())
    assert cfg["method"] == "fs_merge" and cfg["tasks"] == ["fashion", "digits"] and cfg["single_model"]
    card = (out / "README.md").read_text()
    for s in ("library_name: wave-hf", "fs-merge", "base_model:", "tiny/vit-1", "| fashion | 3 |", "0.5"):
        assert s in card, s
    for task in TASKS3[:2]:
        again, info = ViTForImageClassification.from_pretrained(out / task, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            torch.testing.assert_close(again(pixel_values=pixels).logits, merged.logits(pixels, task),
                                       atol=1e-6, rtol=0)
    # the wave-hf loader gives the same object back
    back = MergedViT.from_pretrained(out)
    assert isinstance(back, MergedViT) and back.tasks == merged.tasks
    for k, v in merged.encoder_state.items():
        assert torch.equal(back.encoder_state[k], v)
    # saving again over an existing folder replaces it atomically
    merged.save_pretrained(out)
    assert (out / "fashion" / "config.json").is_file()


def test_loading_needs_no_wave_hf(models3, tmp_path, pixels):
    merged = merge(models3[:2], TASKS3[:2], "average")
    out = merged.save_pretrained(tmp_path / "m")
    torch.save(pixels, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from transformers import ViTForImageClassification\n"
        f"m = ViTForImageClassification.from_pretrained({str(out / 'digits')!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save(m(pixel_values=x).logits.detach(), {str(tmp_path / 'y.pt')!r})\n"
        "assert 'wave_hf' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), merged.logits(pixels, "digits"), atol=1e-6, rtol=0)


# --- training ------------------------------------------------------------------------------------------
def test_training_lowers_loss_and_is_deterministic(models3, data3):
    kw = dict(train_datasets=data3[:2], images_per_task=16, augment_copies=1, rank=2, steps=12, batch_size=16,
              lr=1e-3, lr_diag=1e-2, progress=False)
    a = merge(models3[:2], TASKS3[:2], "fs_merge", **kw)
    assert a.metadata["loss_after"] < a.metadata["loss_before"]
    assert a.metadata["trainable_parameters"] > 0 and a.metadata["steps"] == 12
    b = merge(models3[:2], TASKS3[:2], "fs_merge", **kw)
    for k, v in a.encoder_state.items():
        assert torch.equal(b.encoder_state[k], v), k
    for t in a.tasks:
        assert torch.equal(a.heads[t][0], b.heads[t][0])


@pytest.mark.parametrize("method", ["fs_merge", "kd"])
def test_resume_is_bit_identical(models3, data3, tmp_path, method):
    kw = dict(train_datasets=data3[:2], images_per_task=8, augment_copies=1, steps=6, batch_size=8,
              progress=False)
    full = merge(models3[:2], TASKS3[:2], method, **kw)
    ckpt = str(tmp_path / "run")
    part = merge(models3[:2], TASKS3[:2], method, output_dir=ckpt, stop_after=3, **kw)
    assert part.metadata["steps"] == 3 and (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
    resumed = merge(models3[:2], TASKS3[:2], method, output_dir=ckpt, **kw)
    assert resumed.metadata["steps"] == 6
    for k, v in full.encoder_state.items():
        assert torch.equal(resumed.encoder_state[k], v), k
    for t in full.tasks:
        assert torch.equal(resumed.heads[t][0], full.heads[t][0])


# --- errors --------------------------------------------------------------------------------------------
def _bad(models3, data3, case):
    m, d, t = models3[:2], data3[:2], TASKS3[:2]
    cases = {
        "mismatched": lambda: merge([m[0], tiny_vit(5, num_hidden_layers=3)], t, train_datasets=d),
        "mismatched_width": lambda: merge([m[0], tiny_vit(5, intermediate_size=64)], t, train_datasets=d),
        "one_model": lambda: merge(m[:1], t[:1], train_datasets=d[:1]),
        "no_images": lambda: merge(m, t, train_datasets=[d[0], d[1][:0]]),
        "no_data": lambda: merge(m, t, "regmean"),
        "unknown_method": lambda: merge(m, t, "ties", train_datasets=d),
        "tasks_count": lambda: merge(m, TASKS3, train_datasets=d),
        "datasets_count": lambda: merge(m, t, train_datasets=d[:1]),
        "negative_rank": lambda: merge(m, t, train_datasets=d, rank=-1),
        "unknown_option": lambda: merge(m, t, "average", rank=3),
        "duplicate_tasks": lambda: merge(m, ["a", "a"], "average"),
        "wrong_image_shape": lambda: merge(m, t, train_datasets=[torch.randn(4, 3, 28, 28)] * 2),
    }
    return cases[case]


ERROR_CASES = [
    ("mismatched", ValueError, r"num_hidden_layers is 2 in models\[0\].*but 3 in models\[1\]"),
    ("mismatched_width", ValueError, r"intermediate_size is 128 .* but 64"),
    ("one_model", ValueError, r"at least 2 models.*N=1"),
    ("no_images", ValueError, r"task 'digits' has no images"),
    ("no_data", ValueError, r"needs merge images"),
    ("unknown_method", ValueError, r"unknown merge method 'ties'.*'average'.*'fs_merge'"),
    ("tasks_count", ValueError, r"2 models but 3 task names"),
    ("datasets_count", ValueError, r"2 tasks but 1 datasets"),
    ("negative_rank", ValueError, r"rank must be in \[0, 1024\], got -1"),
    ("unknown_option", TypeError, r"'average' got unknown options \['rank'\]"),
    ("duplicate_tasks", ValueError, r"task names must be unique"),
    ("wrong_image_shape", ValueError, r"images have shape \(3, 28, 28\), the models expect \(1, 28, 28\)"),
]


@pytest.mark.parametrize("case, exc, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_inputs_raise_clear_errors(models3, data3, case, exc, message):
    with pytest.raises(exc, match=message):
        _bad(models3, data3, case)()


# --- every registered method ---------------------------------------------------------------------------
def test_every_method_is_in_the_table():
    assert {m for m, _ in METHOD_CASES} == set(MERGE_METHODS)


@pytest.mark.parametrize("method, kw", METHOD_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHOD_CASES)])
def test_method_end_to_end(models3, data3, pixels, method, kw):
    res = merge(models3, TASKS3, method, train_datasets=data3, images_per_task=8, augment_copies=1, **kw)
    assert res.tasks == TASKS3 and res.metadata["method"] == method
    for i, task in enumerate(TASKS3):
        model = res.for_task(task)
        assert type(model) is ViTForImageClassification
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        assert logits.shape == (5, 3 + i) and torch.isfinite(logits).all()
    task_idx, label = res.predict_joint(pixels)
    assert task_idx.shape == (5,) and (task_idx < 3).all() and (label >= 0).all()
    assert isinstance(res, EnsembleViT) == (method == "ensemble")
    assert res.is_single_model == (method != "ensemble")
    if res.is_single_model:  # every task shares one encoder
        a, b = res.for_task(TASKS3[0]).state_dict(), res.for_task(TASKS3[2]).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in L.encoder_keys(2))


def test_ensemble_runs_the_originals(models3, pixels):
    res = merge(models3, TASKS3, "ensemble")
    with torch.no_grad():
        torch.testing.assert_close(res.logits(pixels, "digits"), models3[1](pixel_values=pixels).logits)


def _random_permuted_copy(model, seed=0):
    rng = np.random.default_rng(seed)
    cfg = model.config
    d, h, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd = d // nh
    perms = {"res": rng.permutation(d)}
    for i in range(cfg.num_hidden_layers):
        perms[f"mlp{i}"] = rng.permutation(h)
        heads = rng.permutation(nh)
        iv = np.concatenate([heads[a] * hd + rng.permutation(hd) for a in range(nh)])
        iqk = np.concatenate([heads[a] * hd + rng.permutation(hd) for a in range(nh)])
        perms[f"heads{i}"] = (iv, iqk)
    sd = model.state_dict()
    state, (w, b) = permute_state(encoder_state(model), (sd["classifier.weight"], sd["classifier.bias"]), perms,
                                  cfg.num_hidden_layers)
    copy = ViTForImageClassification(cfg).eval()
    copy.load_state_dict({**state, "classifier.weight": w, "classifier.bias": b})
    return copy


def test_permutation_recovers_a_permuted_copy(models3, data3, pixels):
    m1 = models3[0]
    m2 = _random_permuted_copy(m1)
    with torch.no_grad():  # the copy computes the same function with different weights
        torch.testing.assert_close(m2(pixel_values=pixels).logits, m1(pixel_values=pixels).logits,
                                   atol=1e-5, rtol=0)
    assert not torch.equal(m2.state_dict()[L.layer_key(0, "fc1")], m1.state_dict()[L.layer_key(0, "fc1")])
    res = merge([m1, m2], ["a", "b"], "permute", train_datasets=data3[:2], images_per_task=16)
    for k, v in encoder_state(m1).items():
        torch.testing.assert_close(res.encoder_state[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.heads["b"][0], m1.state_dict()["classifier.weight"], atol=0, rtol=0)
    # plain averaging of the same pair does not recover model 1
    avg = merge([m1, m2], ["a", "b"], "average")
    assert not torch.allclose(avg.encoder_state[L.layer_key(0, "fc1")], m1.state_dict()[L.layer_key(0, "fc1")])


# --- CLI -----------------------------------------------------------------------------------------------
def test_cli_merge(models3, tmp_path, capsys):
    from wave_hf.cli import main

    paths = []
    for i, m in enumerate(models3[:2]):
        m.save_pretrained(tmp_path / f"src{i}")
        paths.append(str(tmp_path / f"src{i}"))
    out = tmp_path / "merged"
    assert main(["--json", "merge", "--models", *paths, "--tasks", "a", "b", "--method", "average",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == ["a", "b"]
    again, info = ViTForImageClassification.from_pretrained(out / "b", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = json.loads((out / "merge_config.json").read_text())
    assert cfg["sources"] == paths


CLI_ERRORS = [
    (["--method", "ties"], "unknown merge method 'ties'"),
    (["--tasks", "a"], "2 --models but 1 --tasks"),
    (["--method", "regmean"], "needs --data"),
    (["--models", "/nonexistent/vit"], "cannot load"),
]


@pytest.mark.parametrize("extra, message", CLI_ERRORS)
def test_cli_merge_bad_input(models3, tmp_path, capsys, extra, message):
    from wave_hf.cli import main

    for i, m in enumerate(models3[:2]):
        m.save_pretrained(tmp_path / f"src{i}")
    args = {"--models": [str(tmp_path / "src0"), str(tmp_path / "src1")], "--tasks": ["a", "b"],
            "--method": ["average"], "--out": [str(tmp_path / "out")]}
    key = None
    for tok in extra:
        if tok.startswith("--"):
            key = tok
            args[key] = []
        else:
            args[key].append(tok)
    if extra[0] == "--models":
        args["--tasks"] = ["a"]
    argv = ["merge"] + [x for k, v in args.items() for x in [k, *v]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_merge_feeds_the_sources_own_preprocessing(models3, tmp_path, capsys, monkeypatch):
    """The merge data is normalised as the sources were trained (their saved image processor); sources saved
    with different processors are refused, naming them."""
    from transformers import ViTImageProcessor

    import wave_hf.data
    from wave_hf.cli import main

    seen = []
    real = wave_hf.data.load_image_dataset
    monkeypatch.setattr(wave_hf.data, "load_image_dataset",
                        lambda *a, **kw: seen.append(kw["preprocessing"]) or real(*a, **kw))
    paths = []
    for i, m in enumerate(models3[:2]):
        m.save_pretrained(tmp_path / f"src{i}")
        ViTImageProcessor(image_mean=[0.3], image_std=[0.2], resample=3).save_pretrained(tmp_path / f"src{i}")
        paths.append(str(tmp_path / f"src{i}"))
    assert main(["merge", "--models", *paths, "--tasks", "a", "b", "--data", "digits", "digits",
                 "--method", "regmean", "--images-per-task", "8", "--out", str(tmp_path / "m")]) == 0
    assert [(p.image_mean, p.image_std, p.resample) for p in seen] == [((0.3,), (0.2,), "bicubic")] * 2
    ViTImageProcessor(image_mean=[0.5], image_std=[0.5]).save_pretrained(tmp_path / "src1")
    capsys.readouterr()
    assert main(["merge", "--models", *paths, "--tasks", "a", "b", "--data", "digits", "digits",
                 "--method", "regmean", "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "different preprocessing" in err and paths[1] in err and len(err.strip().splitlines()) == 1
