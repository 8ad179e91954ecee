"""FS-Merge training as the official code does it: online augmentation, inner / all-token / all-model losses,
per-target standardisation and the activation-matched init (tiny ViTs, as tests/test_merge.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_merge import TASKS3, noise_images, randomize_, tiny_vits

from wave_hf.merge import merge
from wave_hf.merge.common import AugmentConfig, augment_view, encoder_state, mix_batch, site_features
from wave_hf.merge.permute import aligned_models
from wave_hf.merge.supernet import SuperNet
from wave_hf.merge.train import (
    EpochBatchSampler,
    OnlineViews,
    ReconstructionSpec,
    Teachers,
    online_loss_fn,
    target_scales,
)

FAST = dict(images_per_task=8, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def models2():
    return tiny_vits(2)


@pytest.fixture(scope="module")
def data2():
    return noise_images(2, 12, clamp=True)


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


# --- augmentation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("crop", ["pad", "resized"])
@pytest.mark.parametrize("channels", [1, 3])
def test_augment_view_is_seeded_and_keeps_the_shape(crop, channels):
    x = torch.rand(channels, 28, 28) * 2 - 1
    cfg = AugmentConfig(crop=crop)
    a, b = augment_view(x, rng(0, 1), cfg), augment_view(x, rng(0, 1), cfg)
    assert a.shape == x.shape and torch.equal(a, b)
    views = [augment_view(x, rng(0, k), cfg) for k in range(6)]
    assert len({v.sum().item() for v in views}) > 1  # different seeds, different views
    assert all(torch.isfinite(v).all() for v in views)


def test_each_colour_op_and_identity_config():
    x = torch.rand(3, 16, 16) * 2 - 1
    plain = AugmentConfig(padding=0, flip_prob=0.0, color_prob=0.0)
    assert torch.equal(augment_view(x, rng(1), plain), x)  # no op drawn: the image itself
    outs = {augment_view(x, rng(k), AugmentConfig(padding=0, flip_prob=0.0)).sum().item() for k in range(12)}
    assert len(outs) >= 3  # grayscale / solarize / blur all occur


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0)], ids=["mixup", "cutmix"])
def test_mixing_stays_within_a_task_and_skips_originals(alphas):
    x = torch.stack([torch.full((1, 8, 8), float(v)) for v in range(6)])
    groups = torch.tensor([0, 0, 1, 1, -1, 0])
    cfg = AugmentConfig(mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
    out = mix_batch(x, groups, rng(3), cfg)
    assert torch.equal(out[4], x[4])  # an original (group -1) is never mixed
    partner = {0: 5, 1: 1, 2: 3, 3: 2, 5: 0}  # each task's augmented views, paired with their mirror
    for b, p in partner.items():
        lo, hi = min(b, p), max(b, p)
        assert lo <= out[b].min().item() <= out[b].max().item() <= hi  # only the pair's pixels (or a blend)
    assert not torch.equal(out, x)


def test_online_views_depend_only_on_seed_and_step(data2):
    data = OnlineViews(data2, 2, AugmentConfig(), seed=5)
    assert len(data) == 24 * 3
    sampler = EpochBatchSampler(len(data), 16, 12, 5, global_index=True)
    first = [data.__getitems__(b) for b in sampler]
    again = [data.__getitems__(b) for b in EpochBatchSampler(len(data), 16, 12, 5, global_index=True)]
    for a, b in zip(first, again):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["task_ids"], b["task_ids"])
    # the same item in two epochs: a fresh view (online), the original stays the original
    size = len(data)
    view = 24 + 3  # first view of image 3
    e0, e1 = data.__getitems__([view])["pixel_values"], data.__getitems__([size + view])["pixel_values"]
    assert not torch.equal(e0, e1)
    assert torch.equal(data.__getitems__([3])["pixel_values"][0], data.images[3])
    assert torch.equal(data.__getitems__([size + 3])["pixel_values"][0], data.images[3])


def test_mixed_batch_targets_are_recomputed_from_the_originals(models2, data2):
    data = OnlineViews(data2, 3, AugmentConfig(), seed=0)
    batch = data.__getitems__(list(range(24, 56)))  # augmented views only, both tasks
    assert not any(torch.equal(batch["pixel_values"][i], data.images[i % 24]) for i in range(32))
    spec = ReconstructionSpec()
    loss_fn = online_loss_fn(Teachers(models2), spec, spec.sites(2), None)
    net = SuperNet(models2, TASKS3[:2], rank=2)
    loss_fn(net, batch)
    x, ids = batch["pixel_values"], batch["task_ids"]
    for i, m in enumerate(models2):
        rows = ids == i
        want = site_features(m, x[rows], ["final"])["final"]
        assert torch.equal(batch["targets"][rows, :, 0], want)


# --- sites, losses, normalisation --------------------------------------------------------------------------
def test_supernet_sites_match_model_1_at_first_init(models2, data2):
    """At init="first" the SuperNet is model 1: stream 0 of every site equals model 1's own features (the
    hooks read the same tensors as the SuperNet's unmerged streams)."""
    net = SuperNet(models2, TASKS3[:2], rank=2, init="first")
    sites = ReconstructionSpec(inner="both", tokens="all").sites(2)
    mine = net(data2[0][:4], sites=sites, tokens="all")
    ref = site_features(models2[0], data2[0][:4], sites, "all")
    for s in sites:
        assert mine[s].shape[:3] == (4, 17, 2)  # 16 patches + CLS
        torch.testing.assert_close(mine[s][:, :, 0], ref[s], atol=1e-5, rtol=1e-5)


def test_standardize_scales_are_per_model_std(models2, data2):
    spec = ReconstructionSpec(inner="mlp", inner_layers=[1], normalize="standardize")
    sites = spec.sites(2)
    scales = target_scales(Teachers(models2), data2, sites, spec)
    for i, m in enumerate(models2):
        f = site_features(m, data2[i], sites)
        for s in sites:
            v = f[s].reshape(-1, f[s].shape[-1]).double()
            torch.testing.assert_close(scales[s][i].double(), v.std(0, unbiased=False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(augmentation="online", online_views=2),
    dict(tokens="all", inner="both", normalize="standardize"),
    dict(augmentation="online", online_views=1, inner="att", inner_layers=[0], targets="all", init="average"),
], ids=["online", "inner-all-tokens-std", "all-targets"])
def test_online_losses_decrease_and_fold_exactly(models2, data2, kw):
    res = merge(models2, TASKS3[:2], "fs_merge", train_datasets=data2, rank=2, steps=20, lr=3e-3, lr_diag=3e-2,
                **{**FAST, "images_per_task": 12, "batch_size": 12}, **kw)
    assert res.metadata["loss_after"] < res.metadata["loss_before"]
    net, x = res.supernet, data2[1][:5]
    for i, task in enumerate(res.tasks):
        with torch.no_grad():
            torch.testing.assert_close(res.for_task(task)(pixel_values=x).logits, net.logits(x, i),
                                       atol=1e-4, rtol=1e-4)


def test_online_run_is_deterministic_and_resumes_bit_identically(models2, data2, tmp_path):
    kw = dict(train_datasets=data2, rank=2, steps=6, augmentation="online", online_views=1, inner="mlp",
              normalize="standardize", **FAST)
    full = merge(models2, TASKS3[:2], "fs_merge", **kw)
    again = merge(models2, TASKS3[:2], "fs_merge", **kw)
    ckpt = str(tmp_path / "run")
    merge(models2, TASKS3[:2], "fs_merge", output_dir=ckpt, stop_after=3, **kw)
    resumed = merge(models2, TASKS3[:2], "fs_merge", output_dir=ckpt, **kw)
    assert resumed.metadata["steps"] == 6
    for k, v in full.encoder_state.items():
        assert torch.equal(again.encoder_state[k], v), k
        assert torch.equal(resumed.encoder_state[k], v), k


def test_kd_trains_online_on_the_same_data(models2, data2):
    res = merge(models2, TASKS3[:2], "kd", train_datasets=data2, steps=8, augmentation="online", online_views=1,
                inner="att", lr=1e-3, **FAST)
    assert res.metadata["loss_after"] < res.metadata["loss_before"]
    assert res.metadata["augment_copies"] == 0  # views are drawn online, none made offline


# --- activation-matched init -------------------------------------------------------------------------------
def test_permute_init_starts_as_the_permute_baseline_and_folds_exactly(models2, data2):
    x = torch.cat(data2)
    aligned = aligned_models(models2, x)
    for m, a in zip(models2, aligned):  # a permutation of hidden units: same function
        torch.testing.assert_close(a(pixel_values=x[:6]).logits, m(pixel_values=x[:6]).logits, atol=1e-5, rtol=1e-5)
    base = merge(models2, TASKS3[:2], "permute", train_datasets=data2, images_per_task=12)
    start = SuperNet(aligned, TASKS3[:2], rank=2, init="average").fold()
    for k, v in base.encoder_state.items():
        torch.testing.assert_close(start.encoder_state[k], v, atol=1e-6, rtol=1e-6)
    res = merge(models2, TASKS3[:2], "fs_merge", train_datasets=data2, rank=2, steps=4, init="permute", **FAST)
    assert res.metadata["options"]["init"] == "permute"
    net = randomize_(res.supernet)
    folded = net.fold()
    for i, task in enumerate(folded.tasks):
        with torch.no_grad():
            torch.testing.assert_close(folded.for_task(task)(pixel_values=x[:5]).logits, net.logits(x[:5], i),
                                       atol=1e-4, rtol=1e-4)
    assert encoder_state(folded.for_task(TASKS3[0])).keys() == encoder_state(models2[0]).keys()


# --- options -------------------------------------------------------------------------------------------------
BAD = [
    (dict(augmentation="mixup"), ValueError, r"augmentation must be one of \['shift', 'online'\], got 'mixup'"),
    (dict(online_views=-1), ValueError, r"online_views must be in \[0, 256\], got -1"),
    (dict(online_views=2.0), TypeError, r"online_views must be an int"),
    (dict(tokens="patch"), ValueError, r"tokens must be one of \['cls', 'all'\], got 'patch'"),
    (dict(inner=1), TypeError, r"inner must be a str"),
    (dict(inner_layers=[0, -2]), ValueError, r"inner_layers\[1\] must be >= 0, got -2"),
    (dict(inner_layers="0"), TypeError, r"inner_layers must be a list"),
    (dict(inner_weight=float("nan")), ValueError, r"inner_weight must be a finite number >= 0"),
    (dict(targets="mine"), ValueError, r"targets must be one of"),
    (dict(normalize="l1"), ValueError, r"normalize must be one of \['none', 'standardize'\], got 'l1'"),
    (dict(init="zipit"), ValueError, r"init must be one of \['first', 'average', 'permute'\], got 'zipit'"),
    (dict(match_images=0), ValueError, r"match_images must be >= 1, got 0"),
    (dict(augment_config={"crop": "center"}), ValueError, r"augment.crop must be one of"),
    (dict(augment_config={"flip_prob": 2}), ValueError, r"augment.flip_prob must be a finite number in \[0"),
    (dict(augment_config={"blur": 1}), TypeError, r"augment got unknown options \['blur'\]"),
    (dict(augment_config={"scale": (0.9, 0.2)}), ValueError, r"augment.scale must have low <= high"),
]


@pytest.mark.parametrize("kw, exc, message", BAD, ids=[next(iter(k)) + str(i) for i, (k, _, _) in enumerate(BAD)])
def test_bad_options_fail_before_any_work(models2, kw, exc, message):
    with pytest.raises(exc, match=message):
        merge(models2, TASKS3[:2], "fs_merge", train_datasets=None, **kw)


def test_inner_layer_beyond_depth_and_kd_all_targets_are_refused(models2, data2):
    with pytest.raises(ValueError, match=r"inner_layers must be in \[0, 1\] .* got 5"):
        merge(models2, TASKS3[:2], "fs_merge", train_datasets=data2, steps=1, inner="att", inner_layers=[5], **FAST)
    with pytest.raises(ValueError, match=r"kd supports targets='routed' only"):
        merge(models2, TASKS3[:2], "kd", train_datasets=data2, targets="all")
