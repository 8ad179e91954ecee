"""Atomic folder writes and "local dir or Hub repo id" resolution, shared by every saver and loader."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final``, on error it vanishes.

    A reader never sees a half-written folder: the old version stays in place until the new one is
    complete, and is swapped out by two renames.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the published folder gets the usual permissions
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resolve_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
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
            )
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{name!r} (revision {revision or 'main'}) is not a local folder and is not in the Hub cache; "
            "connect to the Hub or unset HF_HUB_OFFLINE / local_files_only"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(f"no Hub repo {name!r} at revision {revision or 'main'}: {err}") from err


def push_folder(
    save: Callable[[Path], None],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
) -> str:
    """``create_repo(exist_ok=True)`` + ``save`` into a temp folder + one ``upload_folder`` commit.

    This is huggingface_hub's ``ModelHubMixin.push_to_hub``; transformers' own version replaces README.md
    with a generic card, which would lose ours.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"
        save(folder)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
        )
    return str(getattr(info, "commit_url", info))
