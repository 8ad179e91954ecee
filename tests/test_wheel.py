"""The package as users get it: build the wheel, install it into a fresh venv, and use it from there.

The editable install hides packaging mistakes (a card template or the default bank missing from the wheel),
so this test imports wave_hf from the venv and checks that the module really comes from the wheel.
Dependencies come from the running interpreter (``--system-site-packages``) so that nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = """
import json, subprocess, sys, torch
from pathlib import Path
import wave_hf
from wave_hf import TemplateBank, WaveInitializer, WaveTemplateConfig
out = Path(sys.argv[1])
assert sys.argv[2] in wave_hf.__file__, wave_hf.__file__  # the wheel's copy, not the checkout
torch.manual_seed(0)
bank = TemplateBank(WaveTemplateConfig(template_width=16, num_templates=2, num_vector_templates=2, head_dim=16,
                                       aux_depth=2, aux_width=32))
WaveInitializer(bank).save_pretrained(out / "bank")            # needs the packaged card template
init = WaveInitializer.from_pretrained("default")              # the packaged default bank
model = init.build(2, init.config.template_width, num_labels=3)
model.save_pretrained(out / "vit")
print(json.dumps({"card": (out / "bank" / "README.md").is_file(), "module": wave_hf.__file__}))
"""

RELOAD = """
import sys, torch
from transformers import ViTForImageClassification
model = ViTForImageClassification.from_pretrained(sys.argv[1]).eval()
c = model.config
with torch.no_grad():
    logits = model(torch.zeros(1, c.num_channels, c.image_size, c.image_size)).logits
assert logits.shape == (1, 3) and torch.isfinite(logits).all()
assert "wave_hf" not in sys.modules
print("ok")
"""


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    # Build from a copy of the sources: an in-tree build would write build/ into the checkout, and a stale
    # build/lib there (a module deleted since) would end up in the wheel.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "wave_hf", src / "wave_hf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True)
    wheel = next(dist.glob("wave_hf-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    site = str(env_dir)
    res = subprocess.run([str(python), "-c", SMOKE, str(work), site], cwd=work, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"card": true' in res.stdout
    cli = subprocess.run([str(env_dir / "bin" / "wave-hf"), "info", str(work / "bank"), "--json"], cwd=work,
                         env=env, capture_output=True, text=True)
    assert cli.returncode == 0 and '"template_width": 16' in cli.stdout, cli.stderr[-2000:]
    reload = subprocess.run([str(python), "-c", RELOAD, str(work / "vit")], cwd=work, env=env,
                            capture_output=True, text=True)
    assert reload.stdout.strip() == "ok", reload.stderr[-2000:]
