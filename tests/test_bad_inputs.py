"""Bad inputs over every public entry point: a typed error naming the value and the accepted range, and no
partial output left behind. The CLI turns each into exit code 2 and one readable line.

The README's troubleshooting section lists these cases.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from transformers import ViTConfig, ViTForImageClassification

from wave_hf import Scalers, TemplateBank, WaveInitializer
from wave_hf.cli import main as cli


def tiny_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    """A teacher matching the tiny bank's auxiliary model (3 x 48, head dim 16, patch 7)."""
    kw = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=192, image_size=28,
              patch_size=7, num_channels=1, layer_norm_eps=1e-6, num_labels=4)
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**{**kw, **overrides}))


def images(n: int, labels=None, channels: int = 1, drop_labels: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        item = {"pixel_values": torch.randn(channels, 28, 28, generator=g)}
        if not drop_labels:
            item["labels"] = (labels[i] if labels is not None else i % 4)
        out.append(item)
    return out


class Ctx:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        torch.manual_seed(0)
        self.bank = TemplateBank(tiny_config())
        self.bank_dir = tmp_path / "bank"
        self.bank.save_pretrained(self.bank_dir)
        self.init = WaveInitializer(self.bank)

    def edit_config(self, **changes) -> Path:
        path = self.bank_dir / "config.json"
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg))
        return self.bank_dir

    def fit(self, data, **kw):
        return self.init.fit_scalers(1, 16, data, steps=2, batch_size=2, progress=False, **kw)

    def distill(self, teacher, **kw):
        from wave_hf.distill import distill

        return distill(teacher, images(4), config=tiny_config(), steps=1, batch_size=2, progress=False, **kw)

    def merge(self, models, tasks, **kw):
        from wave_hf.merge import merge

        return merge(models, tasks, **kw)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# (id, call, error type, message pattern)
CASES = [
    # --- WaveInitializer.from_pretrained / the bank on disk
    ("path-missing", lambda c: WaveInitializer.from_pretrained(c.tmp / "nope"), FileNotFoundError,
     "neither a folder nor a Hub repo id"),
    ("repo-unknown-offline", lambda c: WaveInitializer.from_pretrained("acme/none", cache_dir=c.tmp / "cache",
                                                                       local_files_only=True),
     FileNotFoundError, "'acme/none'.*not in the Hub cache"),
    ("config-not-json", lambda c: (_write(c.bank_dir / "config.json", b"{not json"),
                                   WaveInitializer.from_pretrained(c.bank_dir)), OSError, "config.json|JSON"),
    ("config-other-model-type", lambda c: WaveInitializer.from_pretrained(c.edit_config(model_type="vit")),
     ValueError, "model_type='vit'.*'wave_templates'"),
    ("config-bad-value", lambda c: WaveInitializer.from_pretrained(c.edit_config(template_width=-4)),
     ValueError, "config.json key .template_width.: template_width must be in \\[1, 8192\\], got -4"),
    ("weights-zero-bytes", lambda c: (_write(c.bank_dir / "model.safetensors", b""),
                                      WaveInitializer.from_pretrained(c.bank_dir)), OSError, "empty \\(zero bytes\\)"),
    ("weights-truncated", lambda c: (_write(c.bank_dir / "model.safetensors",
                                            (c.bank_dir / "model.safetensors").read_bytes()[:-64]),
                                     WaveInitializer.from_pretrained(c.bank_dir)), OSError, "truncated or corrupt"),
    ("template-wrong-shape", lambda c: WaveInitializer.from_pretrained(c.edit_config(num_templates=5)),
     (ValueError, OSError), "templates|shape|size"),
    # --- build / parametrize
    ("depth-zero", lambda c: c.init.build(0, 32), ValueError, "depth must be in \\[1, 1024\\], got 0"),
    ("depth-str", lambda c: c.init.build("2", 32), TypeError, "depth must be an int, got '2'"),
    ("width-not-multiple", lambda c: c.init.build(2, 40), ValueError, "width=40 must be a positive multiple.*=16"),
    ("width-negative", lambda c: c.init.build(2, -16), ValueError, "width=-16 must be a positive multiple"),
    ("heads-not-dividing", lambda c: c.init.build(2, 48, num_heads=5), ValueError,
     "num_heads=5 does not divide width=48; accepted"),
    ("num-labels-zero", lambda c: c.init.build(2, 32, num_labels=0), ValueError, "num_labels must be in \\[1, 100000\\], got 0"),
    ("scalers-wrong-size", lambda c: c.init.build(3, 32, scalers=c.init.scalers_for(2, 32)), ValueError,
     "scalers are for depth=2.*asked for depth=3"),
    ("scalers-nan", lambda c: (lambda s: (s.matrix["o"].data.fill_(float("nan")), s.save(c.tmp / "s.safetensors"),
                                          Scalers.load(c.tmp / "s.safetensors", c.init.config)))(
        c.init.scalers_for(2, 32)), ValueError, "matrix.o contains NaN or Inf"),
    ("lowrank-negative", lambda c: c.init.build(2, 32, lowrank_rank=-1), ValueError,
     "lowrank_rank must be an int in \\[0, 32\\].*got -1"),
    ("lowrank-float", lambda c: c.init.parametrize(2, 32, lowrank_rank=1.5), ValueError,
     "lowrank_rank must be an int in \\[0, 32\\].*got 1.5"),
    ("lowrank-str", lambda c: c.init.build(2, 32, lowrank_rank="2"), ValueError,
     "lowrank_rank must be an int in \\[0, 32\\].*got '2'"),
    ("lowrank-above-width", lambda c: c.init.build(2, 32, lowrank_rank=33), ValueError,
     "lowrank_rank must be an int in \\[0, 32\\].*got 33"),
    ("lowrank-other-rank", lambda c: c.init.build(2, 32, lowrank_rank=3,
                                                  scalers=c.init.scalers_for(2, 32, lowrank_rank=2)), ValueError,
     "carry a rank-2 low-rank correction; lowrank_rank=3 would replace it \\(accepted: 0 or 2\\)"),
    # --- fit_scalers
    ("fit-lowrank-above-width", lambda c: c.fit(images(4), lowrank_rank=17), ValueError,
     "lowrank_rank must be an int in \\[0, 16\\].*got 17"),
    ("fit-empty-dataset", lambda c: c.fit([]), ValueError, "empty"),
    ("fit-no-labels", lambda c: c.fit(images(4, drop_labels=True)), (ValueError, KeyError), "labels"),
    ("fit-label-out-of-range", lambda c: c.fit(images(4, labels=[0, 1, 2, 9]), num_labels=4), ValueError,
     "label 9, outside the accepted range \\[0, 3\\]"),
    ("fit-steps-zero", lambda c: c.init.fit_scalers(1, 16, images(4), steps=0, progress=False), ValueError, "steps"),
    # --- distill
    ("distill-teacher-patch", lambda c: c.distill(tiny_vit(patch_size=4)), ValueError,
     "config.patch_size=7 but the teacher has 4"),
    ("distill-teacher-channels", lambda c: c.distill(tiny_vit(num_channels=3)), ValueError,
     "config.num_channels=1 but the teacher has 3"),
    ("distill-unknown-init", lambda c: c.distill(tiny_vit(), init="magic"), ValueError, "init must be one of"),
    # --- merge
    ("merge-one-model", lambda c: c.merge([tiny_vit()], ["a"], method="average"), ValueError, "N >= 2"),
    ("merge-mismatched", lambda c: c.merge([tiny_vit(), tiny_vit(1, num_hidden_layers=2)], ["a", "b"],
                                           method="average"), ValueError, "num_hidden_layers"),
    ("merge-unknown-method", lambda c: c.merge([tiny_vit(), tiny_vit(1)], ["a", "b"], method="zipit9"), ValueError,
     "unknown merge method 'zipit9'; registered methods"),
    ("merge-task-without-images", lambda c: c.merge([tiny_vit(), tiny_vit(1)], ["a", "b"], method="fs_merge",
                                                    train_datasets=[images(4), []]), ValueError,
     "task 'b' has no images"),
    # --- data
    ("data-channels", lambda c: __import__("wave_hf.data", fromlist=["x"]).load_image_dataset("digits", num_channels=2),
     ValueError, "num_channels must be 1 or 3, got 2"),
    ("data-fmnist-missing", lambda c: __import__("wave_hf.data", fromlist=["x"]).load_image_dataset(
        "fashion_mnist", data_dir=str(c.tmp / "nowhere")), FileNotFoundError, "dataset-fashion-mnist"),
]


@pytest.mark.parametrize("name, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, name, call, error, message):
    ctx = Ctx(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=message):
        call(ctx)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in before and p.name != "s.safetensors")
    assert not [x for x in leftovers if ".tmp-" in x or ".old-" in x], leftovers


CLI_CASES = [
    ("cli-depth-zero", ["build", "--depth", "0", "--width", "32"], "argument --depth: must be an int >= 1, got '0'"),
    ("cli-width", ["build", "--depth", "2", "--width", "40"], "width=40 must be a positive multiple"),
    ("cli-bank-missing", ["build", "--templates", "/no/such/bank", "--depth", "2", "--width", "32"],
     "'/no/such/bank' is neither a folder nor a Hub repo id"),
    ("cli-merge-unknown-method", ["merge", "--models", "a", "b", "--tasks", "x", "y", "--method", "zipit9"],
     "zipit9"),
]


@pytest.mark.parametrize("name, args, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exit_2(tmp_path, capsys, name, args, message):
    ctx = Ctx(tmp_path)
    if args[0] == "build" and "--templates" not in args:
        args = [*args, "--templates", str(ctx.bank_dir)]
    args = [*args, "--out", str(tmp_path / "out")]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_cli_read_only_output_dir(tmp_path, capsys):
    ctx = Ctx(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code = cli(["build", "--templates", str(ctx.bank_dir), "--depth", "1", "--width", "16", "--out", str(ro / "m")])
    assert code == 2 and "Permission denied" in capsys.readouterr().err


def test_cli_full_disk_leaves_previous_output(tmp_path, capsys, monkeypatch):
    """A save that fails half-way (ENOSPC simulated) keeps the previous version and leaves no temp folder."""
    ctx = Ctx(tmp_path)
    out = tmp_path / "model"
    assert cli(["build", "--templates", str(ctx.bank_dir), "--depth", "1", "--width", "16", "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()

    def full_disk(self, save_directory, **kwargs):
        Path(save_directory, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ViTForImageClassification, "save_pretrained", full_disk)
    code = cli(["build", "--templates", str(ctx.bank_dir), "--depth", "2", "--width", "32", "--out", str(out)])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "model"]


def test_cli_read_only_output_dir_simulated(tmp_path, capsys, monkeypatch):
    """The same case as root (CI), where permissions do not bite: the OS refuses the temp folder."""
    ctx = Ctx(tmp_path)

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr("wave_hf.io.tempfile.mkdtemp", refuse)
    code = cli(["build", "--templates", str(ctx.bank_dir), "--depth", "1", "--width", "16",
                "--out", str(tmp_path / "ro" / "m")])
    err = capsys.readouterr().err
    assert code == 2 and "Permission denied" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ro" / "m").exists()
