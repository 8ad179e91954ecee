"""Helpers shared by the benchmark scripts (benchmarks/ is a scripts folder, not a package)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of wave-hf's benchmark artefacts: ``$WAVE_HF_CACHE``, else ``~/.cache/wave_hf``.

    Trained weights live here rather than in the repository, so reruns reuse them and git stays small.
    """
    return Path(os.environ.get("WAVE_HF_CACHE") or Path.home() / ".cache" / "wave_hf").expanduser()


def learngene_dir(teacher_tag: str, width: int, steps: int, batch: int) -> Path:
    """Where ``tleg_learngenes.py`` keeps TLEG's learngene of this teacher, width and budget (``init_sizes`` reads it)."""
    return cache_dir() / "learngene" / f"{teacher_tag}-s{steps}x{batch}" / f"w{width}"
