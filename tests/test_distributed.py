"""``accelerate launch`` on 2 CPU processes gives the 1-process result for distillation and merging.

(Scaler fitting has the same check in test_fit.py.) The launch goes through the running interpreter
(``_accelerate_fit_script.accelerate_launch``), so the test runs wherever gloo does: it is skipped only when
torch.distributed has no gloo backend, and it checks that the job really trained on 2 processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _accelerate_fit_script import accelerate_launch

HERE = Path(__file__).parent
JOB = HERE / "_jobs.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed has no gloo backend on this machine",
)


@pytest.mark.parametrize("kind", ["distill", "merge"])
def test_two_processes_match_one(kind, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = subprocess.run([sys.executable, str(JOB), kind, str(tmp_path / "one"), "0"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(JOB, kind, str(tmp_path / "two"), "0")
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "world.json").read_text()) == {"num_processes": 1, "torch_world_size": 1}
    assert json.loads((tmp_path / "two" / "world.json").read_text()) == {"num_processes": 2, "torch_world_size": 2}
    a = torch.load(tmp_path / "one" / "result.pt")
    b = torch.load(tmp_path / "two" / "result.pt")
    assert sorted(a) == sorted(b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff
