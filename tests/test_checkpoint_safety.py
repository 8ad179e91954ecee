"""Checkpoints never unpickle, refuse another run's folder, survive a kill mid-write, and a NaN stops a run
before anything is saved (issue 12, items 2 and 4), through both kinds of caller of the one loop
(``wave_hf.loop.run_loop``): a dataset job (``fit_scalers``) and ``train_reconstruction`` (FS-Merge, KD)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import safetensors.torch as st
import torch
from _accelerate_fit_script import tiny_setup
from testing_common import assert_same_results, assert_state_dicts_equal
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from wave_hf.checkpoint import (
    CKPT_DIR,
    CheckpointError,
    CheckpointMismatchError,
    NonFiniteError,
    UnsafeCheckpointError,
    complete_checkpoints,
    ensure_finite_parameters,
    load_latest,
    save_checkpoint,
)
from wave_hf.fit import fit_scalers
from wave_hf.merge.train import TrainConfig, train_reconstruction

HERE = Path(__file__).resolve().parent
JOB = HERE / "_jobs.py"
FIT = dict(num_labels=4, steps=5, batch_size=8, max_images=24, lr=1e-2, checkpoint_every=2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


class Payload:
    """Unpickling this creates ``marker``: the proof that a file's contents ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(folder: Path, marker: Path, names=("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin")):
    """An accelerate-looking checkpoint whose every file runs code when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))


# -------------------------------------------------------------------------------- reconstruction loop
class Tiny(nn.Module):
    """A task-routed feature model small enough for many runs per second."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 4)
        self.diag = nn.Parameter(torch.ones(4))

    def forward(self, x, task_ids):
        return self.proj(x) * self.diag + task_ids[:, None].float()


def recon_data(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.arange(n) % 2, torch.randn(n, 4, generator=g)


def recon(out: Path | None, **kw):
    """``(trained state, result)`` of a tiny reconstruction run."""
    data = kw.pop("data", None) or recon_data()
    cfg = TrainConfig(**{"steps": 6, "batch_size": 4, "lr": 1e-2, "lr_diag": 1e-2, "progress": False,
                         "output_dir": str(out) if out else None, "save_every": 2, **kw})
    module = Tiny()
    res = train_reconstruction(module, *data, cfg, fingerprint={"method": "test"})
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, res


# --------------------------------------------------------------------------------------- (a) pickle
@pytest.mark.parametrize("loop", ["fit", "reconstruction"])
def test_pickle_only_folder_is_refused_and_never_unpickled(loop, setup, tmp_path):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    plant(run / CKPT_DIR / "step_00000004", marker)
    plant(run / CKPT_DIR, marker, names=("stray.pkl",))
    with pytest.raises(UnsafeCheckpointError, match="will not unpickle") as err:
        if loop == "fit":
            fit_scalers(setup[0], 2, 32, setup[1], output_dir=run, **FIT)
        else:
            recon(run)
    assert isinstance(err.value, ValueError)
    assert "custom_checkpoint_0.pkl" in str(err.value) and "arbitrary code" in str(err.value)
    assert not marker.exists()
    assert sorted(p.name for p in (run / CKPT_DIR).iterdir()) == ["step_00000004", "stray.pkl"]  # nothing deleted


def test_pickle_next_to_a_safe_checkpoint_is_ignored(setup, tmp_path):
    init, data = setup
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    fit_scalers(init, 2, 32, data, output_dir=run, max_steps=2, **FIT)
    [safe] = complete_checkpoints(run)
    assert safe.step == 2
    plant(safe.path, marker)  # inside the safe checkpoint
    plant(run / CKPT_DIR / "step_00000099", marker)  # a newer, pickle-only "checkpoint"
    plant(run / CKPT_DIR, marker, names=("custom_checkpoint_0.pkl",))
    resumed = fit_scalers(init, 2, 32, data, output_dir=run, **FIT)
    assert not marker.exists()
    assert_state_dicts_equal(resumed, fit_scalers(init, 2, 32, data, **FIT))  # same bits as without checkpoints
    assert [c.step for c in complete_checkpoints(run)] == [4, 5]  # step 2 (with its planted file) pruned
    assert (run / CKPT_DIR / "step_00000099" / "custom_checkpoint_0.pkl").is_file()  # foreign: left alone


def test_a_foreign_folder_with_a_step_name_is_never_replaced(setup, tmp_path):
    init, data = setup
    run = tmp_path / "run"
    foreign = run / CKPT_DIR / "step_00000002"  # e.g. an accelerate save_state folder from older wave-hf
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds files wave-hf did not write"):
        fit_scalers(init, 2, 32, data, output_dir=run, **FIT)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_files_written_are_safetensors_and_json_only(setup, tmp_path):
    fit_scalers(setup[0], 2, 32, setup[1], output_dir=tmp_path, **FIT)
    [*_, last] = complete_checkpoints(tmp_path)
    assert sorted(p.name for p in last.path.iterdir()) == [
        "meta.json", "model.safetensors", "optimizer.safetensors", "rng_state.safetensors", "state.json"]
    meta = json.loads((last.path / "meta.json").read_text())
    assert meta["step"] == 5 and meta["fingerprint"]["job"] == "fit" and meta["fingerprint"]["seed"] == 0
    assert [c.step for c in complete_checkpoints(tmp_path)] == [4, 5]  # keep_checkpoints=2
    assert not [p for p in (tmp_path / CKPT_DIR).iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------- (b) fingerprint
def other_data(n: int = 32) -> datasets.Dataset:
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 4, (n,), generator=g)
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.tolist()}).with_format("torch")


@pytest.mark.parametrize("change, field", [
    ({"seed": 1}, "seed=1 here, 0 in the checkpoint"),
    ({"lr": 2e-2}, "lr=0.02 here, 0.01 in the checkpoint"),
    ({"steps": 7}, "steps=7 here, 5 in the checkpoint"),
    ({"data": "other"}, "data='sha256:"),
    ({"width": 48}, "size='2x48' here, '2x32' in the checkpoint"),
])
def test_fit_refuses_another_runs_checkpoint(setup, tmp_path, change, field):
    init, data = setup
    fit_scalers(init, 2, 32, data, output_dir=tmp_path, max_steps=2, **FIT)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    kw = {**FIT, **{k: v for k, v in change.items() if k not in ("data", "width")}}
    width = change.get("width", 32)
    with pytest.raises(CheckpointMismatchError, match=re.escape(field)) as err:
        fit_scalers(init, 2, width, other_data() if "data" in change else data, output_dir=tmp_path, **kw)
    assert "step_00000002 was written by a different run" in str(err.value)
    assert "pick another --checkpoint-dir" in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # untouched


@pytest.mark.parametrize("change, field", [
    ({"seed": 3}, "seed=3 here, 0"),
    ({"lr": 5e-2}, "lr=0.05 here, 0.01"),
    ({"lr_diag": 5e-2}, "lr_diag=0.05 here, 0.01"),
    ({"batch_size": 8}, "batch_size=8 here, 4"),
    ({"steps": 8}, "steps=8 here, 6 in the checkpoint"),
    ({"data": recon_data(seed=1)}, "data='sha256:"),
])
def test_reconstruction_refuses_another_runs_checkpoint(tmp_path, change, field):
    recon(tmp_path, stop_after=2)
    with pytest.raises(CheckpointMismatchError, match=re.escape(field)):
        recon(tmp_path, **change)


def test_same_run_resumes_bit_identical_after_a_torn_newest_checkpoint(tmp_path):
    full, _ = recon(None)
    recon(tmp_path, stop_after=4, save_every=1, keep_checkpoints=3)
    newest = complete_checkpoints(tmp_path)[-1].path
    opt = newest / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # torn after the rename (disk trouble)
    (tmp_path / CKPT_DIR / ".tmp-step_00000005-999999999").mkdir()  # a dead writer's leftover
    assert [c.step for c in complete_checkpoints(tmp_path)] == [2, 3]
    resumed, res = recon(tmp_path, save_every=1, keep_checkpoints=3)
    assert res.resumed_from == 3 and len(res.losses) == 6
    assert_state_dicts_equal(full, resumed)
    assert not [p for p in (tmp_path / CKPT_DIR).iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ (c) kill mid-write
def job(kind: str, workdir: Path, kill_at: int = 0, mode: str = "step") -> subprocess.CompletedProcess:
    workdir.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(JOB), kind, str(workdir), str(kill_at), mode], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("kind", ["fit", "merge"])
def test_sigkill_during_a_checkpoint_write_then_rerun_is_bit_identical(kind, tmp_path):
    clean = job(kind, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    # 3 files per checkpoint: the 5th save_file call is the 2nd checkpoint's optimizer file, cut in half
    killed = job(kind, tmp_path / "killed", kill_at=5, mode="save")
    assert killed.returncode == -9, killed.stderr[-2000:]
    root = tmp_path / "killed" / "checkpoints"  # the jobs' output_dir
    ckpt = root / CKPT_DIR
    assert [c.step for c in complete_checkpoints(root)] == [2]
    assert [p.name.split("-")[1] for p in ckpt.iterdir() if p.name.startswith(".tmp-")] == ["step_00000004"]
    resumed = job(kind, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_results(tmp_path / "clean" / "result.pt", tmp_path / "killed" / "result.pt")
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # the torn temp folder was swept


# --------------------------------------------------------------------------------- (d) finite or fail
def nan_data(rows) -> datasets.Dataset:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 4, (32,), generator=g)
    x[rows, 0, 3, 5] = float("nan")
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.tolist()}).with_format("torch")


def test_nan_pixels_stop_fit_at_the_step_with_nothing_saved(setup, tmp_path):
    init, _ = setup
    with pytest.raises(NonFiniteError, match=r"non-finite pixel_values at step 1 of 5 \(pixel_values: \d+ NaN"):
        fit_scalers(init, 2, 32, nan_data(slice(None)), output_dir=tmp_path / "all", **FIT)
    assert not list((tmp_path / "all").rglob("step_*"))
    with pytest.raises(NonFiniteError, match=r"non-finite pixel_values at step (\d) of 5") as err:
        fit_scalers(init, 2, 32, nan_data([5]), output_dir=tmp_path / "one",
                    **{**FIT, "checkpoint_every": 1, "max_images": None})
    step = int(re.search(r"at step (\d)", str(err.value)).group(1))
    # the steps before it were fine and kept (keep_checkpoints=2); nothing at or after the failing step
    assert [c.step for c in complete_checkpoints(tmp_path / "one")] == list(range(max(step - 2, 1), step))


@pytest.mark.parametrize("loop", ["fit", "reconstruction"])
def test_huge_lr_stops_with_a_typed_error_not_nan_weights(loop, setup, tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite (loss|parameter \S+) (at|after) step \d") as err:
        if loop == "fit":
            fit_scalers(setup[0], 2, 32, setup[1], output_dir=tmp_path, **{**FIT, "lr": 1e30})
        else:
            recon(tmp_path, lr=1e30, lr_diag=1e30)
    assert "lower the learning rate" in str(err.value)
    assert all(bool(torch.isfinite(t).all()) for c in complete_checkpoints(tmp_path)
               for t in st.load_file(str(c.path / "model.safetensors")).values())


def test_nan_targets_stop_the_reconstruction_loop(tmp_path):
    x, ids, y = recon_data()
    y[3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite targets at step \d of 6 .*check the source models"):
        recon(tmp_path, data=(x, ids, y))


def test_non_finite_parameters_are_named():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite parameter bias after step 7 \(bias: 0 NaN and 1 Inf"):
        ensure_finite_parameters(model, step=7)


# ------------------------------------------------------------------------------ the format itself
@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_optimizer_and_scheduler_round_trip_through_json_and_safetensors(schedule, tmp_path):
    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = torch.optim.AdamW([{"params": [model.weight], "lr": 1e-2}, {"params": [model.bias], "lr": 1e-3}])
        if schedule == "cosine":
            sched = get_cosine_schedule_with_warmup(opt, 2, 10)
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-2, 1e-3], total_steps=10,
                                                        anneal_strategy="linear")
        return model, opt, sched

    def train(model, opt, sched, steps):
        for i in range(steps):
            model(torch.full((4, 3), float(i))).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    model, opt, sched = make()
    train(model, opt, sched, 3)
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, progress_state={"step": 3},
                    fingerprint={"seed": 0})
    model2, opt2, sched2 = make()
    state = load_latest(tmp_path, {"seed": 0}).restore(model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 3}
    assert_state_dicts_equal(model.state_dict(), model2.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    train(model, opt, sched, 4)
    train(model2, opt2, sched2, 4)
    assert_state_dicts_equal(model.state_dict(), model2.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_checkpoint_with_nan_is_refused(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = get_cosine_schedule_with_warmup(opt, 0, 4)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, progress_state={},
                           fingerprint={})
    tensors = st.load_file(str(path / "model.safetensors"))
    tensors["bias"][0] = float("nan")
    st.save_file(tensors, str(path / "model.safetensors"))  # same size: meta.json still matches
    with pytest.raises(CheckpointError, match="bias holds NaN or Inf"):
        load_latest(tmp_path, {}).restore(model=model, optimizer=opt, scheduler=sched)


# -------------------------------------------------------------------------------------------- CLI
def test_cli_fit_checkpoint_dir_resumes_and_refuses_another_seed(tiny_bank, tmp_path, capsys):
    from wave_hf.cli import main

    tiny_bank.save_pretrained(tmp_path / "bank")
    args = ["fit", "--templates", str(tmp_path / "bank"), "--depth", "2", "--width", "32", "--num-heads", "2",
            "--data", "digits", "--max-images", "32", "--steps", "3", "--checkpoint-dir", str(tmp_path / "ck")]
    assert main([*args, "--out", str(tmp_path / "out1")]) == 0
    assert [c.step for c in complete_checkpoints(tmp_path / "ck")] == [3]
    capsys.readouterr()
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "was written by a different run" in err and "seed=1 here, 0 in the checkpoint" in err
    assert not (tmp_path / "out2").exists()
