"""A run SIGKILLed mid-way resumes from its last checkpoint to the same bits as an uninterrupted run; a save
killed mid-way leaves the previous version of the output intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from testing_common import assert_same_results

JOB = Path(__file__).with_name("_jobs.py")


def run(kind: str, workdir: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    workdir.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(JOB), kind, str(workdir), str(kill_at)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("kind", ["fit", "distill", "merge"])
def test_sigkill_then_resume_is_bit_identical(kind, tmp_path):
    clean = run(kind, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = run(kind, tmp_path / "killed", kill_at=5)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "result.pt").exists()
    assert any((tmp_path / "killed" / "checkpoints").rglob("*")), "no checkpoint written before the kill"
    resumed = run(kind, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_results(tmp_path / "clean" / "result.pt", tmp_path / "killed" / "result.pt")


SAVE_KILLED = """
import os, signal, sys, torch
import safetensors.torch as st
from wave_hf import TemplateBank
from conftest import tiny_config
torch.manual_seed(1)
bank = TemplateBank(tiny_config())
real = st.save_file
def dying_save(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
st.save_file = dying_save
import transformers.modeling_utils as mu
if hasattr(mu, "safe_save_file"):
    mu.safe_save_file = dying_save
bank.save_pretrained(sys.argv[1])
"""


def test_save_killed_midway_keeps_previous_version(tiny_bank, tmp_path):
    out = tmp_path / "bank"
    tiny_bank.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = subprocess.run([sys.executable, "-c", SAVE_KILLED, str(out)], capture_output=True, text=True,
                         cwd=Path(__file__).parent, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    # the killed writer may leave its own hidden staging folder behind; every file of the previous version stays
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".wave-hf-tmp-")} == before
    from wave_hf import WaveInitializer

    WaveInitializer.from_pretrained(out)  # still loads
    tiny_bank.save_pretrained(out)  # the next save sweeps the dead writer's leftovers
    assert not [p for p in out.iterdir() if p.name.startswith(".wave-hf-tmp-")]
