"""Output folders that cannot hurt: saves keep unrelated files, readers never see a missing output, concurrent
writers end with one complete version, and the CLI refuses an ``--out`` that would overwrite its inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from wave_hf import TemplateBank, WaveInitializer
from wave_hf.cli import main as cli
from wave_hf.io import OUTPUT_MARKER, STAGING_PREFIX, publish_dir

HERE = Path(__file__).parent
BANK_FILES = {"config.json", "model.safetensors", "README.md"}


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_into_a_git_clone_keeps_git_and_unrelated_files(tiny_init, tmp_path):
    repo = tmp_path / "clone"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "notes.md").write_text("my notes\n")
    (repo / "other-model").mkdir()
    (repo / "other-model" / "config.json").write_text("{}\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "mine"], check=True)
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        tiny_init.save_pretrained(".")  # the usual way to publish into a Hub repo clone
    finally:
        os.chdir(cwd)
    assert (repo / "notes.md").read_text() == "my notes\n"
    assert (repo / "other-model" / "config.json").read_text() == "{}\n"
    log = subprocess.run([*git, "log", "--format=%s"], check=True, capture_output=True, text=True).stdout
    assert log.strip() == "mine"
    assert {p.name for p in repo.iterdir()} >= BANK_FILES
    assert not [p for p in repo.iterdir() if p.name.startswith(STAGING_PREFIX)]
    WaveInitializer.from_pretrained(repo)


def test_resave_replaces_owned_files_only(tiny_init, tmp_path, images):
    out = tmp_path / "bank"
    fitted = tiny_init.scalers_for(1, 16)
    tiny_init.add_scalers(fitted)
    tiny_init.save_pretrained(out)
    (out / "mine.txt").write_text("keep")
    assert (out / "scalers").is_dir() and len(list((out / "scalers").iterdir())) == 1
    WaveInitializer(tiny_init.bank).save_pretrained(out)  # the new version has no fitted sizes
    assert (out / "mine.txt").read_text() == "keep"
    assert list((out / "scalers").iterdir()) == []  # the stale scalers file was ours, so it went
    assert WaveInitializer.from_pretrained(out).fitted == {}


def test_failed_save_leaves_previous_version_and_no_temp(tiny_bank, tmp_path):
    out = tmp_path / "bank"
    tiny_bank.save_pretrained(out)
    before = listing(out)
    with pytest.raises(RuntimeError, match="boom"), publish_dir(out) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("boom")
    assert listing(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_nan_weights_are_refused_and_nothing_is_written(tiny_bank, tmp_path):
    with torch.no_grad():
        tiny_bank.templates["qkv"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to save.*'templates.qkv' has 1 NaN/Inf"):
        tiny_bank.save_pretrained(tmp_path / "bank")
    assert not (tmp_path / "bank").exists()


def test_stale_staging_of_dead_writers_is_swept(tiny_bank, tmp_path):
    out = tmp_path / "bank"
    tiny_bank.save_pretrained(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = out / f"{STAGING_PREFIX}{dead.stdout.strip()}-abc"
    live = out / f"{STAGING_PREFIX}{os.getpid()}-xyz"  # a writer still at work: left alone
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    tiny_bank.save_pretrained(out)
    assert not stale.exists() and live.exists()


READER = """
import os, sys, time
folder, stop = sys.argv[1], sys.argv[2]
names = ["config.json", "model.safetensors", "README.md"]
checks = missing = 0
while not os.path.exists(stop):
    for name in names:
        checks += 1
        missing += not os.path.isfile(os.path.join(folder, name))
print(checks, missing)
"""


def test_reader_polling_during_1000_saves_never_finds_the_output_missing(tiny_bank, tmp_path):
    out, stop = tmp_path / "bank", tmp_path / "stop"
    tiny_bank.save_pretrained(out)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(1000):
            tiny_bank.save_pretrained(out)
    finally:
        stop.touch()
        checks, missing = map(int, reader.communicate(timeout=60)[0].split())
    assert checks > 1000 and missing == 0
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]


WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from conftest import tiny_config
from wave_hf import TemplateBank
torch.manual_seed(int(sys.argv[2]))
bank = TemplateBank(tiny_config())
for _ in range(10):
    bank.save_pretrained(sys.argv[1])
"""


def test_three_concurrent_writers_end_with_one_complete_folder(tmp_path):
    out = tmp_path / "bank"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(seed), str(HERE)],
                              stderr=subprocess.PIPE, text=True) for seed in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert {p.name for p in out.iterdir()} == BANK_FILES  # no temp or .old folders left
    loaded = WaveInitializer.from_pretrained(out).bank
    candidates = []
    for seed in range(3):
        torch.manual_seed(seed)
        candidates.append(TemplateBank(tiny_config()))
    assert any(all(torch.equal(loaded.state_dict()[k], c.state_dict()[k]) for k in loaded.state_dict())
               for c in candidates), "the folder mixes files of different writers"


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def bank_dir(tiny_bank, tmp_path) -> Path:
    folder = tmp_path / "inputs" / "bank"
    tiny_bank.save_pretrained(folder)
    return folder


def build_args(bank: Path, out: str, *extra: str) -> list[str]:
    return ["build", "--templates", str(bank), "--depth", "1", "--width", "16", "--out", out, *extra]


@pytest.mark.parametrize("out", [".", "./", "", "..", "{cwd}"])
def test_cli_refuses_the_current_folder_and_its_parents(bank_dir, tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert cli(build_args(bank_dir, out.format(cwd=work))) == 2
    err = capsys.readouterr().err
    assert "--out" in err and repr(out.format(cwd=work)) in err
    assert sorted(p.name for p in work.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("which", ["input", "parent-of-input"])
def test_cli_refuses_an_input_or_its_parent(bank_dir, capsys, which):
    out = bank_dir if which == "input" else bank_dir.parent
    before = listing(bank_dir.parent)
    assert cli(build_args(bank_dir, str(out))) == 2
    assert "is the input" in capsys.readouterr().err
    assert listing(bank_dir.parent) == before


def test_cli_merge_refuses_parent_of_its_models(tmp_path, capsys):
    from test_merge import tiny_vit

    models = tmp_path / "P"
    for name, seed in (("vitA", 0), ("vitB", 1)):
        tiny_vit(seed).save_pretrained(models / name)
    before = listing(models)
    code = cli(["merge", "--models", str(models / "vitA"), str(models / "vitB"), "--tasks", "a", "b",
                "--method", "average", "--out", str(models)])
    assert code == 2 and "is the input" in capsys.readouterr().err
    assert listing(models) == before


def test_cli_refuses_a_foreign_non_empty_folder_unless_overwrite(bank_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert cli(build_args(bank_dir, str(out))) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(build_args(bank_dir, str(out), "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "keep" and (out / "config.json").is_file()
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "build"
    assert cli(build_args(bank_dir, str(out))) == 0  # our own output: a rerun may write it again


def test_cli_json_after_the_subcommand_and_errors_as_json(bank_dir, tmp_path, capsys):
    assert cli([*build_args(bank_dir, str(tmp_path / "m")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["depth"] == 1
    assert cli([*build_args(bank_dir, str(tmp_path / "m2")), "--json", "--width", "-3"]) == 2
    error = json.loads(capsys.readouterr().out)
    assert error["type"] == "UsageError" and "'-3'" in error["error"]
    assert cli(["--json", *build_args(bank_dir, str(tmp_path / "m3"), "--width", "40")]) == 2
    error = json.loads(capsys.readouterr().out)
    assert error["type"] == "ValueError" and "width=40" in error["error"]
