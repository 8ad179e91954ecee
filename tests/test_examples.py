"""Every example runs as written (on tiny settings), in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wave_hf.initializer import DEFAULT_BANK

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
needs_bank = pytest.mark.skipif(not (DEFAULT_BANK / "model.safetensors").is_file(), reason="no embedded bank")

CASES = [
    pytest.param("quickstart.py", [], marks=needs_bank, id="quickstart"),
    pytest.param("finetune_with_trainer.py", ["--data", "digits", "--depth", "1", "--width", "64", "--fit-steps", "2",
                                              "--train-images", "64", "--test-images", "32", "--epochs", "1"],
                 marks=needs_bank, id="finetune_with_trainer"),
    pytest.param("merge_vits.py", ["--quick"], id="merge_vits"),
]


@pytest.mark.parametrize("script, args", CASES)
def test_example_runs(script, args, tmp_path):
    out = tmp_path / "out"
    extra = [] if script == "quickstart.py" else ["--out", str(out)]
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *args, *extra], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    if extra:
        assert out.exists()
