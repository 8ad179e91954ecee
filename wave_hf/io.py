"""Safe output folders, "local dir or Hub repo id" resolution and Hub upload, shared by every saver and loader.

An output folder is often a place the user cares about (a git clone of a Hub repo, a folder of notes), so
``publish_dir`` behaves as transformers' ``save_pretrained`` does: it writes the files it owns and leaves
every other file alone. Files are staged in a private folder inside the target, then each is moved into
place with an atomic ``os.replace`` (``config.json`` files last), under an inter-process lock, so a reader
never finds the output missing and concurrent writers end with one complete version.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from huggingface_hub import HfApi, ModelHubMixin, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

STAGING_PREFIX = ".wave-hf-tmp-"
OUTPUT_MARKER = ".wave-hf-output.json"
_CONFIG_NAMES = ("config.json", "merge_config.json")
_STAGING_RE = re.compile(rf"^{re.escape(STAGING_PREFIX)}(\d+)-")


def _lock_path(folder: Path) -> Path:
    """A lock file outside the folder (in the temp dir), so that the folder itself gains no lock file."""
    digest = hashlib.sha256(os.fsencode(folder)).hexdigest()[:24]
    locks = Path(tempfile.gettempdir()) / "wave-hf-locks"
    locks.mkdir(exist_ok=True)
    return locks / f"{digest}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_staging(folder: Path) -> list[Path]:
    """Remove staging folders of ours that a killed writer left in ``folder`` (their process is gone)."""
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = _STAGING_RE.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _staged_files(staging: Path) -> list[Path]:
    """Every staged file, relative to ``staging``: configs last, the top-level config very last."""
    files = [p.relative_to(staging) for p in staging.rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(files, key=lambda p: (p.name in _CONFIG_NAMES, p.name in _CONFIG_NAMES and len(p.parts) == 1,
                                        str(p)))


@contextlib.contextmanager
def publish_dir(target: str | os.PathLike, *, owned: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging folder; on success publish its files into ``target`` one atomic rename each.

    Files of ``target`` that the new version does not contain are kept, except those matching one of the
    ``owned`` glob patterns (relative paths, e.g. ``"scalers/*.safetensors"``): those belonged to an earlier
    version written by the same saver and are removed. On error the staging folder vanishes and ``target``
    is untouched.
    """
    if not os.fspath(target):
        raise ValueError("output folder must be a non-empty path, got ''")
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=target))
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()
        raise
    try:
        yield staging
        files = _staged_files(staging)
        umask = os.umask(0)
        os.umask(umask)
        for rel in files:  # savers that write through mkstemp leave 0600; publish with the usual permissions
            if not (staging / rel).is_symlink():
                (staging / rel).chmod(0o666 & ~umask)
        with FileLock(_lock_path(target)):
            sweep_stale_staging(target)
            new = {p.as_posix() for p in files}
            for pattern in owned:
                for old in target.glob(pattern):
                    rel = old.relative_to(target).as_posix()
                    if old.is_file() and rel not in new and fnmatch.fnmatch(rel, pattern):
                        old.unlink()
            for rel in files:
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.is_dir() and not dest.is_symlink():
                    raise IsADirectoryError(f"cannot write {dest}: a folder of that name is in the way")
                os.replace(staging / rel, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # a failed first save leaves no empty folder behind
            with contextlib.suppress(OSError):
                target.rmdir()


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuse to save a broken model: a NaN or Inf weight is named, and nothing is written."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"refusing to save {what}: tensor {name!r} has {bad} NaN/Inf values "
                             f"(of {tensor.numel()}); nothing was written")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                     overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output folder whose writing could hurt what the user has, before any work is done.

    Refused: an empty path; the current folder or one of its ancestors; an input or an ancestor of an
    input (local paths only: a Hub repo id is not a folder); a non-empty folder that wave-hf did not write
    (its ``OUTPUT_MARKER`` is missing) unless ``overwrite``. Nothing in the folder is ever deleted, but
    writing into a foreign folder would mix our files with the user's.
    """
    text = os.fspath(out)
    if not text.strip():
        raise ValueError(f"{flag} must name a folder, got {text!r}")
    path = Path(text).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, path):
        raise ValueError(f"{flag} {text!r} is the current folder or one of its parents ({path}); "
                         "give a new sub-folder, e.g. --out outputs/model")
    for ref in inputs:
        ref_text = os.fspath(ref)
        if not ref_text or not os.path.exists(ref_text):
            continue
        ref_path = Path(ref_text).expanduser().resolve()
        if _is_within(ref_path, path):
            raise ValueError(f"{flag} {text!r} is the input {ref_text!r} or a folder containing it; "
                             "give an output folder outside the inputs")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {text!r} exists and is not a folder")
    if (path.is_dir() and any(not p.name.startswith(STAGING_PREFIX) for p in path.iterdir())
            and not (path / OUTPUT_MARKER).is_file() and not overwrite):
        raise FileExistsError(f"{flag} {text!r} is a non-empty folder that wave-hf did not write; "
                              "pass --overwrite to write into it anyway (other files are kept)")
    return path


def mark_output(folder: str | os.PathLike, command: str) -> None:
    """Record that ``folder`` is a wave-hf output, so that a later run may write into it again."""
    path = Path(folder) / OUTPUT_MARKER
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"written_by": "wave-hf", "command": command}) + "\n")
    os.replace(tmp, path)


def resolve_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
    force_download: bool = False,
) -> Path:
    """A local folder for a local path or a Hub repo id (honours ``revision``, cache and offline mode)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    name = os.fspath(path_or_repo_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name!r} is neither a folder nor a Hub repo id ('org/name')")
    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
                allow_patterns=allow_patterns,
                force_download=force_download,
            )
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{name!r} (revision {revision or 'main'}) is not a local folder and is not in the Hub cache; "
            "connect to the Hub or unset HF_HUB_OFFLINE / local_files_only"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        what = "revision" if isinstance(err, RevisionNotFoundError) else "repo (or revision: some servers say so)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"no Hub repo {name!r} at revision {revision or 'main'}: unknown {what} "
                                f"({first})") from err


def push_folder(
    save: Callable[[Path], None],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool = False,
    delete_patterns: list[str] | str | None = None,
):
    """``create_repo(exist_ok=True)`` + ``save`` into a temp folder + one ``upload_folder`` commit.

    The body of huggingface_hub's ``ModelHubMixin.push_to_hub``, for ``TemplateBank``, a transformers model
    whose own ``push_to_hub`` would replace our README.md with a generic card.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"
        save(folder)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=branch, create_pr=create_pr, delete_patterns=delete_patterns)


class HubMixin(ModelHubMixin):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for wave-hf's own objects, from two hooks.

    ``ModelHubMixin`` gives ``push_to_hub`` (one commit, ``branch``, ``create_pr``, ``delete_patterns``);
    its save and load are replaced by safe ones: the save publishes through ``publish_dir`` (other files in
    the folder are kept, each file lands atomically), the load resolves a folder or a repo id (revision,
    cache, offline) to one local folder and hands it to ``_from_folder``. Subclasses write ``_save_pretrained``
    and ``_from_folder``; ``owned_files`` are files of an earlier version that a new save or push removes.
    """

    owned_files: tuple[str, ...] = ()
    download_patterns: tuple[str, ...] | None = None

    def _save_pretrained(self, save_directory: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _from_folder(cls, folder: Path, name: str, **kwargs: Any):  # pragma: no cover - abstract
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike, *, config: Any = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None,
                        **push_to_hub_kwargs: Any) -> Any:
        """Write the folder (see the class docstring); with ``push_to_hub=True`` also upload it."""
        with publish_dir(save_directory, owned=self.owned_files) as tmp:
            self._save_pretrained(tmp)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).absolute().name, **push_to_hub_kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, delete_patterns: list[str] | str | None = None, **kwargs: Any):
        """``ModelHubMixin.push_to_hub``; by default files this object owns and no longer has are deleted."""
        patterns = list(self.owned_files) if delete_patterns is None else delete_patterns
        return super().push_to_hub(repo_id, delete_patterns=patterns or None, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, revision: str | None = None, **kwargs: Any):
        """Load from a local folder or a Hub repo id (``revision``, ``cache_dir``, offline mode)."""
        folder = resolve_folder(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, token=token, force_download=force_download,
                                allow_patterns=list(cls.download_patterns) if cls.download_patterns else None)
        return cls._from_folder(folder, os.fspath(pretrained_model_name_or_path), **kwargs)
