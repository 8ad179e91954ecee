"""``accelerate launch`` on 2 CPU processes gives the 1-process result for distillation and merging.

(Scaler fitting has the same check in test_fit.py.) accelerate's ``--cpu`` launcher starts a single process
unless MPI is installed, so the torchrun-based launcher runs with ``ACCELERATE_USE_CPU`` (gloo backend).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
JOB = HERE / "_jobs.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available() or not shutil.which("accelerate"),
    reason="torch.distributed with gloo, or the accelerate CLI, is unavailable",
)


@pytest.mark.parametrize("kind", ["distill", "merge"])
def test_two_processes_match_one(kind, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = subprocess.run([sys.executable, str(JOB), kind, str(tmp_path / "one"), "0"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0", str(JOB), kind, str(tmp_path / "two"), "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "result.pt")
    b = torch.load(tmp_path / "two" / "result.pt")
    assert sorted(a) == sorted(b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff
