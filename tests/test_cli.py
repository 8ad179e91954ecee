"""The ``wave-hf`` command line: results, atomic outputs, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import ViTForImageClassification

from wave_hf.cli import main


@pytest.fixture
def bank_dir(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    return tmp_path / "bank"


def test_build_writes_a_loadable_model(bank_dir, tmp_path, capsys):
    code = main(["--json", "build", "--templates", str(bank_dir), "--depth", "2", "--width", "32",
                 "--num-heads", "2", "--num-labels", "3", "--out", str(tmp_path / "vit")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    model, info = ViTForImageClassification.from_pretrained(tmp_path / "vit", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.num_labels == 3


def test_info_prints_the_bank(bank_dir, capsys):
    assert main(["--json", "info", str(bank_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["template_width"] == 16 and info["aux_model"] == "3x48"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depth", "0", "--width", "32"], "argument --depth: must be an int >= 1, got '0'"),
        (["--depth", "2", "--width", "40"], "width=40 must be a positive multiple"),
        (["--depth", "2", "--width", "48", "--num-heads", "5"], "num_heads=5 does not divide width=48"),
    ],
)
def test_bad_input_exits_2_with_one_line(bank_dir, tmp_path, capsys, args, message):
    code = main(["build", "--templates", str(bank_dir), *args, "--out", str(tmp_path / "vit")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "vit").exists()


def test_missing_bank_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    code = main(["info", "acme/does-not-exist"])
    assert code == 2
    assert "acme/does-not-exist" in capsys.readouterr().err


def test_console_script_help_lists_examples():
    out = subprocess.run([sys.executable, "-m", "wave_hf.cli", "--help"], capture_output=True, text=True, check=True)
    assert "examples:" in out.stdout and "wave-hf build" in out.stdout


def test_fit_with_lowrank_saves_the_correction_with_the_bank(bank_dir, tmp_path, capsys):
    from wave_hf import WaveInitializer

    out = tmp_path / "fitted"
    args = ["--json", "fit", "--templates", str(bank_dir), "--depth", "2", "--width", "32", "--num-heads", "2",
            "--data", "digits", "--max-images", "64", "--steps", "2", "--out", str(out)]
    assert main([*args, "--lowrank-rank", "2"]) == 0
    with_lowrank = json.loads(capsys.readouterr().out)["parameters"]
    assert main([*args[:-1], str(tmp_path / "plain")]) == 0
    plain = json.loads(capsys.readouterr().out)["parameters"]
    scalers = WaveInitializer.from_pretrained(out).scalers_for(2, 32, 2)
    assert with_lowrank == sum(p.numel() for p in scalers.parameters()) > plain


def test_command_line_sets_a_passive_wait_policy_and_the_library_does_not():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    probe = "import os, sys; sys.argv[0] = {!r}; import wave_hf; print(os.environ.get('OMP_WAIT_POLICY'))"
    as_cli = subprocess.run([sys.executable, "-c", probe.format("wave-hf")], env=env, capture_output=True, text=True)
    as_lib = subprocess.run([sys.executable, "-c", probe.format("train.py")], env=env, capture_output=True, text=True)
    assert as_cli.stdout.strip() == "PASSIVE" and as_lib.stdout.strip() == "None"
