"""Training checkpoints without pickle, written atomically and tied to the run that wrote them.

Why not ``Accelerator.save_state``: it pickles (``custom_checkpoint_*.pkl`` and the RNG states are loaded
with ``weights_only=False``, so a file planted in a checkpoint folder runs code on resume), a kill while it
writes leaves a truncated folder that every rerun then fails on, and it records nothing about the run, so a
folder reused with another seed or dataset silently resumes the wrong run. Here:

* **Only safetensors and JSON.** Trainable parameters, optimizer tensors and RNG states are safetensors; the
  optimizer's scalar state and param groups, the scheduler state (callables such as ``LambdaLR``'s lambdas
  are dropped: they are rebuilt by construction), the step counter and the loss history are JSON. Loading
  never unpickles; a folder that holds only pickles (an old accelerate checkpoint) is refused, never read.
* **Atomic.** A checkpoint is written into ``checkpoints/.tmp-step_XXXXXXXX-<pid>`` and renamed to
  ``checkpoints/step_XXXXXXXX`` when complete; ``meta.json`` (written last) lists every file with its size.
  Resume takes the newest complete checkpoint; leftovers of killed writers are swept by the main process.
* **Fingerprinted.** ``meta.json`` records the run's fingerprint (method, size, seed, lrs, batch size, total
  steps, a data hash, ...); a run with another fingerprint refuses the folder and names each differing field.

Under ``accelerate launch`` only the main process writes (every process's RNG state is gathered to it);
every process reads. The loops' data order depends only on ``(seed, step)``, so torch's RNG (CPU and the
current CUDA device) is the only random state kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch as safetensors_torch
import torch
from torch import Tensor, nn
from transformers.utils import logging

from .validation import check_tensors

logger = logging.get_logger(__name__)

CKPT_DIR = "checkpoints"
FORMAT = "wave_hf.checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
STATE_FILE = "state.json"
META_FILE = "meta.json"
OWN_FILES = frozenset({MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, META_FILE})
# What accelerate / torch write with pickle; never loaded, only detected to explain a refusal.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_LEFTOVER_RE = re.compile(r"^\.(?:tmp|old)-step_\d{8,}-(\d+)$")


# ---------------------------------------------------------------------------------------------- errors
class NonFiniteError(ValueError):
    """A NaN or Inf in an input batch, a loss or the trained parameters: the run stops and saves nothing."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from (the message says why and what to do)."""


class CheckpointMismatchError(CheckpointError):
    """The newest checkpoint was written by a run with another fingerprint (seed, lr, data, ...)."""


class UnsafeCheckpointError(CheckpointError):
    """The folder holds pickled checkpoints only; they are never unpickled (that can run arbitrary code)."""


# ---------------------------------------------------------------------------------------- fingerprints
def _update_tensor(h: Any, tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def tensors_fingerprint(tensors: Iterable[Tensor] | Mapping[str, Tensor]) -> str:
    """A short sha256 over dtypes, shapes and bytes (named tensors: names too, in sorted order)."""
    h = hashlib.sha256()
    if isinstance(tensors, Mapping):
        for name in sorted(tensors):
            h.update(f"{name}:".encode())
            _update_tensor(h, tensors[name])
    else:
        for t in tensors:
            _update_tensor(h, t)
    return "sha256:" + h.hexdigest()[:16]


def dataset_fingerprint(dataset: Any, labels: Sequence[int] | None = None, edge: int = 4) -> str:
    """A cheap hash of a map-style image dataset: its length, the first and last ``edge`` items' pixels and
    labels, and every label when given (reading every image of a large set would cost a pass over it)."""
    from .data import collate_images

    n = len(dataset)
    h = hashlib.sha256(f"n={n};".encode())
    for i in sorted(set(range(min(edge, n))) | set(range(max(n - edge, 0), n))):
        batch = collate_images([dataset[i]])
        _update_tensor(h, batch["pixel_values"])
        _update_tensor(h, batch["labels"])
    if labels is not None:
        _update_tensor(h, torch.as_tensor(list(labels), dtype=torch.long))
    return "sha256:" + h.hexdigest()[:16]


def normalize_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as JSON reads it back (tuples become lists), so saved and current compare equal."""
    try:
        return json.loads(json.dumps(dict(fingerprint), allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise TypeError(f"a checkpoint fingerprint must hold JSON values (finite numbers, strings, lists): {err}") \
            from err


def _differences(here: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(here) | set(saved)):
        if key not in saved:
            out.append(f"{key}={here[key]!r} here, missing in the checkpoint")
        elif key not in here:
            out.append(f"{key} missing here, {saved[key]!r} in the checkpoint")
        elif here[key] != saved[key]:
            out.append(f"{key}={here[key]!r} here, {saved[key]!r} in the checkpoint")
    return out


# ------------------------------------------------------------------------------------------- finiteness
def _describe(tensor: Tensor) -> str:
    t = tensor.detach()
    if t.numel() == 1:
        return f"={t.item()}"
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return f": {nan} NaN and {inf} Inf of {t.numel()} values"


def ensure_finite(tensors: Mapping[str, Tensor], *, step: int, total: int, accelerator: Any = None,
                  hints: Mapping[str, str] | None = None) -> None:
    """Raise ``NonFiniteError`` naming the step and the first non-finite tensor (``hints[name]``: what to do).

    Under several processes the verdict is reduced across them, so that every process raises at the same
    step (one process stopping alone would leave the others waiting in DDP's all-reduce forever).
    """
    flags = torch.tensor([0.0 if bool(torch.isfinite(t.detach()).all()) else 1.0 for t in tensors.values()])
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
    if not bool(flags.any()):
        return
    name = list(tensors)[int(torch.nonzero(flags)[0])]
    local = tensors[name]
    detail = f"{name}{_describe(local)}" if not bool(torch.isfinite(local.detach()).all()) else "on another process"
    hint = (hints or {}).get(name, "")
    raise NonFiniteError(f"non-finite {name} at step {step} of {total} ({detail}); the run stopped and nothing "
                         f"was saved for it{'; ' + hint if hint else ''}")


def ensure_finite_parameters(model: nn.Module, *, step: int, hint: str = "") -> None:
    """Raise ``NonFiniteError`` if a trainable parameter holds NaN/Inf (checked before any save)."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteError(f"non-finite parameter {name} after step {step} ({name}{_describe(p)}); the run "
                                 f"stopped and nothing was saved for it{'; ' + hint if hint else ''}")


# ------------------------------------------------------------------------------------------------ json
class _Drop:
    """Marks a value JSON cannot hold (a function, a tensor): dropped from dicts, None in lists."""


_DROP = _Drop()


def _to_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _DROP
    if isinstance(value, tuple):
        return {"__tuple__": [None if v is _DROP else v for v in map(_to_json, value)]}
    if isinstance(value, list):
        return [None if v is _DROP else v for v in map(_to_json, value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: v for k, v in ((k, _to_json(v)) for k, v in value.items()) if v is not _DROP}
    return _DROP


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, allow_nan=False, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------ optimizer
def _optimizer_split(optimizer: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as (tensors for safetensors, everything else for JSON)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        state[str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                state[str(idx)][key] = _to_json(value)
                if state[str(idx)][key] is _DROP:
                    raise TypeError(f"optimizer state {idx}.{key} is a {type(value).__name__}, "
                                    "neither a tensor nor a JSON value")
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        converted = _to_json(group)
        if converted is _DROP or set(converted) != set(group):
            bad = sorted(k for k in group if k not in (converted if isinstance(converted, dict) else {}))
            raise TypeError(f"optimizer param group {i} holds values JSON cannot keep: {bad}")
        groups.append(converted)
    return tensors, {"state": state, "param_groups": groups}


def _optimizer_join(tensors: Mapping[str, Tensor], data: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(idx): _from_json(entry) for idx, entry in data["state"].items()}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": _from_json(data["param_groups"])}


# ------------------------------------------------------------------------------------------------ RNG
def _local_rng() -> dict[str, Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _gather_rng(accelerator: Any) -> dict[str, Tensor]:
    local = _local_rng()
    if accelerator is None or accelerator.num_processes == 1:
        per_rank = [local]
    else:
        from accelerate.utils import gather_object

        per_rank = gather_object([local])  # in-memory exchange between the processes, no file involved
    return {f"{kind}.{rank}": t.cpu().contiguous() for rank, states in enumerate(per_rank)
            for kind, t in states.items()}


def _restore_rng(tensors: Mapping[str, Tensor], rank: int) -> None:
    cpu = tensors.get(f"cpu.{rank}", tensors.get("cpu.0"))
    if cpu is not None:
        torch.set_rng_state(cpu)
    cuda = tensors.get(f"cuda.{rank}", tensors.get("cuda.0"))
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


# ------------------------------------------------------------------------------------------ folders
def step_folder(root: str | os.PathLike, step: int) -> Path:
    """``root/checkpoints/step_XXXXXXXX``."""
    return Path(root) / CKPT_DIR / f"step_{step:08d}"


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """The meta of a complete checkpoint of this format, else None (missing, torn or foreign)."""
    match = _STEP_RE.match(folder.name)
    meta_path = folder / META_FILE
    if match is None or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        return None
    files = meta.get("files")
    if (meta.get("step") != int(match.group(1)) or not isinstance(meta.get("fingerprint"), dict)
            or not isinstance(files, dict) or set(files) != OWN_FILES - {META_FILE}):
        return None
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return meta


@dataclass
class Checkpoint:
    """A complete checkpoint on disk (``meta.json`` valid, every listed file present at its size)."""

    path: Path
    step: int
    fingerprint: dict[str, Any]

    def restore(self, *, model: nn.Module, optimizer: Any, scheduler: Any, accelerator: Any = None) -> dict[str, Any]:
        """Load the state into ``model`` (trainable parameters, in place), ``optimizer``, ``scheduler`` and the
        RNG; return the progress state (step counter, losses). safetensors and JSON only: nothing is unpickled."""
        target = accelerator.unwrap_model(model) if accelerator is not None else model
        saved = self._load_tensors(MODEL_FILE)
        params = {n: p for n, p in target.named_parameters() if p.requires_grad}
        try:
            check_tensors(saved, {n: tuple(p.shape) for n, p in params.items()}, "its trainable parameters")
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {self.path} does not fit this model: {err}; remove the folder or "
                                  "pick another checkpoint folder") from err
        for name, p in params.items():
            value = saved[name]
            if value.dtype != p.dtype:
                raise CheckpointError(f"checkpoint {self.path}: {name} is {value.dtype} there, {p.dtype} here")
            with torch.no_grad():
                p.copy_(value)
        state = json.loads((self.path / STATE_FILE).read_text())
        optimizer.load_state_dict(_optimizer_join(self._load_tensors(OPTIMIZER_FILE), state["optimizer"]))
        scheduler.load_state_dict(_from_json(state["scheduler"]))
        rank = accelerator.process_index if accelerator is not None else 0
        _restore_rng(safetensors_torch.load_file(str(self.path / RNG_FILE)), rank)
        return dict(state["progress"])

    def _load_tensors(self, name: str) -> dict[str, Tensor]:
        tensors = safetensors_torch.load_file(str(self.path / name))
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"checkpoint {self.path / name}: {key} holds NaN or Inf; remove the folder")
        return tensors


def complete_checkpoints(root: str | os.PathLike) -> list[Checkpoint]:
    """The complete checkpoints under ``root/checkpoints``, oldest first (temp, torn and foreign folders skipped)."""
    folder = Path(root) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.is_dir() and (meta := _read_meta(path)) is not None:
            found.append(Checkpoint(path, int(meta["step"]), meta["fingerprint"]))
    return sorted(found, key=lambda c: c.step)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _pickles(folder: Path) -> list[Path]:
    """Pickle-format files in ``folder`` and its step folders (accelerate's ``*.pkl``, ``*.bin``, ...)."""
    out = []
    for path in [folder, *(p for p in folder.iterdir() if p.is_dir() and _STEP_RE.match(p.name))]:
        out += [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in PICKLE_SUFFIXES]
    return sorted(out)


def sweep(root: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left: temp folders of dead processes and torn step folders of this format
    (only our own file names inside, no valid ``meta.json``). Foreign folders are left alone. Returns them."""
    folder = Path(root) / CKPT_DIR
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if not path.is_dir():
            continue
        leftover = _LEFTOVER_RE.match(path.name)
        torn = (_STEP_RE.match(path.name) and _read_meta(path) is None
                and all(f.name in OWN_FILES for f in path.iterdir()))
        if (leftover and not _pid_alive(int(leftover.group(1)))) or torn:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info(f"removed {len(removed)} incomplete checkpoint folder(s) left by an interrupted run")
    return removed


def load_latest(root: str | os.PathLike, fingerprint: Mapping[str, Any], *, accelerator: Any = None
                ) -> Checkpoint | None:
    """The newest complete checkpoint under ``root/checkpoints`` if its fingerprint is this run's, else raise.

    ``None`` when there is none (a fresh start). Raises ``UnsafeCheckpointError`` when the folder holds only
    pickled (accelerate-format) checkpoints, which are never loaded, and ``CheckpointMismatchError`` naming each
    differing field when the newest checkpoint was written by another run. The main process first sweeps
    what killed writers left (``sweep``).
    """
    here = normalize_fingerprint(fingerprint)
    folder = Path(root) / CKPT_DIR
    if accelerator is None or accelerator.is_main_process:
        sweep(root)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    found = complete_checkpoints(root)
    pickles = _pickles(folder) if folder.is_dir() else []
    if not found:
        if pickles:
            names = sorted({p.name for p in pickles})
            raise UnsafeCheckpointError(
                f"checkpoint folder {folder} holds pickle files ({', '.join(names[:6])}) and no safetensors "
                "checkpoint: they look like an accelerate save_state checkpoint, and wave-hf will not unpickle "
                "them (unpickling a file can run arbitrary code). Remove the folder or pick another "
                "--checkpoint-dir / output_dir to start afresh.")
        return None
    latest = found[-1]
    diffs = _differences(here, latest.fingerprint)
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {latest.path} was written by a different run: {'; '.join(diffs)}; remove the folder or "
            "pick another --checkpoint-dir / output_dir")
    if pickles:
        logger.warning(f"ignoring {len(pickles)} pickle file(s) in {folder} (never unpickled); resuming from "
                       f"{latest.path}")
    return latest


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def prune(root: str | os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones (only complete ones of this format)."""
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True)


def save_checkpoint(
    folder_root: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    progress_state: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    accelerator: Any = None,
    keep: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write ``folder_root/checkpoints/step_XXXXXXXX`` atomically; return its path.

    Every process must call it (it gathers RNG states and waits at barriers); only the main process writes.
    An existing complete checkpoint of that step is kept unless ``overwrite``. Older checkpoints beyond the
    newest ``keep`` are deleted afterwards.
    """
    final = step_folder(folder_root, step)
    fp = normalize_fingerprint(fingerprint)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    skip = not overwrite and _read_meta(final) is not None  # every process decides alike before anyone writes
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if skip:
        return final
    if final.exists() and not all(f.name in OWN_FILES for f in final.iterdir()):
        # e.g. an old accelerate save_state folder of that name: it is the user's, never replaced or deleted
        raise CheckpointError(f"{final} exists and holds files wave-hf did not write; move it away or pick "
                              "another checkpoint folder")
    rng = _gather_rng(accelerator)
    if accelerator is None or accelerator.is_main_process:
        target = accelerator.unwrap_model(model) if accelerator is not None else model
        params = {n: p.detach().cpu().contiguous() for n, p in target.named_parameters() if p.requires_grad}
        opt_tensors, opt_json = _optimizer_split(optimizer)
        state = {"progress": _to_json(dict(progress_state)), "optimizer": opt_json,
                 "scheduler": _to_json(scheduler.state_dict())}
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        safetensors_torch.save_file(params, str(tmp / MODEL_FILE))
        safetensors_torch.save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        safetensors_torch.save_file(rng, str(tmp / RNG_FILE))
        _dump_json(tmp / STATE_FILE, state)
        files = {name: (tmp / name).stat().st_size for name in sorted(OWN_FILES - {META_FILE})}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "fingerprint": fp, "files": files,
                "world_size": accelerator.num_processes if accelerator is not None else 1}
        _dump_json(tmp / META_FILE, meta)
        for name in OWN_FILES:
            _fsync(tmp / name)
        if final.exists():  # an overwrite, or a torn folder of ours of that name: move it aside first
            old = final.parent / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
        prune(folder_root, keep)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final
