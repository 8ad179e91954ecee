"""Local (block-by-block) FS-Merge (``schedule="local"``) and the linear-in-N cost of the factored SuperNet
(tiny random ViTs, as tests/test_merge.py)."""

from __future__ import annotations

import pytest
import torch
from test_merge import TASKS3, noise_images, tiny_vit, tiny_vits
from transformers import ViTForImageClassification

from wave_hf.merge import MERGE_METHODS, get_method, merge
from wave_hf.merge.local import BlockStage, block_io
from wave_hf.merge.supernet import SuperNet
from wave_hf.merge.train import Teachers

TASKS = TASKS3[:2]
LOCAL = dict(schedule="local", init="first", rank=2, images_per_task=8, augment_copies=0, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def models4():
    return tiny_vits(4)


@pytest.fixture(scope="module")
def data2():
    return noise_images(2, 8, clamp=True)


@pytest.fixture(scope="module")
def local_run(models4, data2):
    """One short local run shared by the tests that only read it (2 blocks + the final stage, 3 steps each)."""
    return merge(models4[:2], TASKS, "fs_merge", data2, steps=3, **LOCAL)


@pytest.fixture
def pixels():
    return torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(7))


def test_schedule_is_an_fs_merge_option_and_global_by_default():
    assert "schedule" in MERGE_METHODS.options("fs_merge")  # hence `wave-hf merge --set schedule=local`
    assert get_method("fs_merge").schedule == "global"


def test_default_init_is_the_validation_choice():
    """``init="permute"`` won the defaults stage of benchmarks/merge.py on validation (merge.md)."""
    assert get_method("fs_merge").init == "permute"


@pytest.mark.parametrize("bad", ["blockwise", "Local", ""])
def test_bad_schedule_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=rf"schedule.*{bad!r}"):
        get_method("fs_merge", schedule=bad)


def test_local_runs_every_stage(local_run):
    meta = local_run.metadata
    assert [s["block"] for s in meta["local_stages"]] == [0, 1]
    assert meta["steps"] == meta["total_steps"] == 9 and not meta["stopped_early"]  # 2 blocks + final, 3 each
    assert meta["options"]["schedule"] == "local"
    assert all(torch.isfinite(v).all() for v in local_run.encoder_state.values())


def test_local_is_deterministic(local_run, models4, data2):
    again = merge(models4[:2], TASKS, "fs_merge", data2, steps=3, **LOCAL)
    assert local_run.encoder_state.keys() == again.encoder_state.keys()
    for k, v in local_run.encoder_state.items():
        assert torch.equal(v, again.encoder_state[k]), k
    for task in TASKS:
        assert all(torch.equal(a, b) for a, b in zip(local_run.heads[task], again.heads[task]))
    assert local_run.metadata["local_stages"] == again.metadata["local_stages"]


def test_interrupted_local_run_resumes_to_the_same_bits(local_run, models4, data2, tmp_path):
    """``stop_after`` counts the steps of every stage together: stopping inside block 1's stage and rerunning
    finishes the schedule exactly as the uninterrupted run."""
    kw = dict(steps=3, output_dir=str(tmp_path), **LOCAL)
    part = merge(models4[:2], TASKS, "fs_merge", data2, stop_after=4, **kw)
    assert part.metadata["stopped_early"] and part.metadata["steps"] == 4 and part.metadata["loss_after"] is None
    done = merge(models4[:2], TASKS, "fs_merge", data2, **kw)
    assert not done.metadata["stopped_early"] and done.metadata["steps"] == 9
    for k, v in local_run.encoder_state.items():
        assert torch.equal(v, done.encoder_state[k]), k


def test_local_folds_into_a_plain_vit(local_run, pixels):
    net = local_run.supernet
    for i, task in enumerate(TASKS):
        plain = local_run.for_task(task)
        assert type(plain) is ViTForImageClassification
        assert plain.num_parameters() == tiny_vit(0, num_labels=3 + i).num_parameters()  # the original size
        with torch.no_grad():
            torch.testing.assert_close(plain(pixel_values=pixels).logits, net.logits(pixels, i), atol=1e-5, rtol=0)


def test_local_reduces_each_block_loss(models4, data2):
    out = merge(models4[:2], TASKS, "fs_merge", data2, steps=25, lr=3e-3, lr_diag=3e-3, **LOCAL)
    for stage in out.metadata["local_stages"]:
        assert stage["loss_after"] < 0.8 * stage["loss_before"], stage
    assert out.metadata["loss_after"] < out.metadata["loss_before"]  # the final stage on the method's loss


def test_block_zero_stage_reads_the_supernet_embedding(models4, pixels):
    """Block 0's input map is the SuperNet's own m_pre, fed the sources' embeddings: the stage computes
    exactly the SuperNet's block 0 (so what stage 0 trains is what folds)."""
    net = SuperNet(models4[:2], TASKS, rank=2)
    h_in, h_out = block_io(Teachers(models4[:2]), pixels, 0)
    assert h_in.shape == h_out.shape == (5, 17, 2, 32)
    with torch.no_grad():
        stage = BlockStage(net.m_pre, net.blocks[0], net.u_task)
        torch.testing.assert_close(stage.merge_in(h_in), net._embed(pixels), atol=1e-6, rtol=0)
        torch.testing.assert_close(stage(h_in), net.u_task(net.blocks[0](net._embed(pixels))), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [0, 2])
def test_trainable_parameters_grow_linearly_in_n(models4, rank):
    """The factored M/U keep the trainable state linear in N: each extra model adds the same count."""
    counts = [SuperNet(models4[:n], [f"t{i}" for i in range(n)], rank=rank).num_trainable() for n in (2, 3, 4)]
    assert counts[2] - counts[1] == counts[1] - counts[0] > 0
