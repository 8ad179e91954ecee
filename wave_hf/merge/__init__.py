"""Merging N ViTs trained from different inits on different tasks into one ViT (FS-Merge + baselines).

One file per method, one registry (as in mergekit)::

    from wave_hf.merge import merge
    merged = merge([vit_a, vit_b], ["fashion", "digits"], method="fs_merge", train_datasets=[ds_a, ds_b])
    merged.for_task("digits")            # a stock ViTForImageClassification
    merged.save_pretrained("out/")       # out/<task>/ loads with plain transformers

Registered methods: ``fs_merge``, ``average``, ``permute``, ``regmean``, ``kd``, ``ensemble``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from torch import nn

from ..validation import MAX_AUGMENT_COPIES, MAX_SEED, check_int, check_memory
from .common import MergeData, augment, check_images, images_of, model_source, validate_models
from .merged import EnsembleViT, MergedViT
from .registry import MERGE_METHODS, MergeMethod, get_method, register_merge_method


def prepare_data(models, tasks, train_datasets, *, images_per_task: int, augment_copies: int, seed: int,
                 uses_augmented: bool = True) -> MergeData:
    """Take ``images_per_task`` images of each task's dataset and make the augmented copies once (after
    checking that they fit in memory: ``augment_copies`` multiplies every image)."""
    if train_datasets is None:
        raise ValueError("this merge method needs merge images: pass train_datasets=[one dataset per task]")
    if isinstance(train_datasets, (str, bytes)) or len(train_datasets) != len(tasks):
        n = 1 if isinstance(train_datasets, (str, bytes)) else len(train_datasets)
        raise ValueError(f"got {len(tasks)} tasks but {n} datasets; give one dataset per task")
    config = models[0].config
    per_image = 4 * config.num_channels * config.image_size**2  # float32 (C, H, W)
    count = sum(min(images_per_task, len(ds)) if hasattr(ds, "__len__") else images_per_task
                for ds in train_datasets)
    copies = 1 + (augment_copies if uses_augmented else 0)
    # x2: the originals and copies are concatenated once more for training (``MergeData.all_images``).
    check_memory(2 * per_image * count * copies,
                 f"{count} merge images x {copies} (originals + augment_copies={augment_copies})")
    originals = [images_of(ds, images_per_task, seed=seed + i, task=t)
                 for i, (ds, t) in enumerate(zip(train_datasets, tasks))]
    check_images(originals, tasks, models[0].config)
    aug = [augment(x, augment_copies if uses_augmented else 0, seed=seed + 1000 + i) for i, x in enumerate(originals)]
    return MergeData(originals=originals, augmented=aug)


def merge(models: Sequence[nn.Module], tasks: Sequence[str], method: str = "fs_merge", train_datasets=None,
          images_per_task: int = 100, *, augment_copies: int = 8, seed: int = 0, **kwargs):
    """Merge N ``ViTForImageClassification`` (one per task) with a registered method.

    Args:
        models: N >= 2 source models of one architecture (different inits are fine).
        tasks: one task name per model (used as folder names when saving).
        method: a name in ``MERGE_METHODS``.
        train_datasets: one dataset per task (tensor (n, C, H, W), ``datasets.Dataset`` or list of
            ``{"pixel_values": ...}`` items); needed by every method except ``average`` and ``ensemble``.
        images_per_task: original images taken per task (the paper: 100; low-data setting: 16).
        augment_copies: shifted copies of each original made once, offline (training methods only).
        seed: seed of the image subset, the augmentations, the init and the training order.
        **kwargs: options of the method (see its dataclass fields, e.g. ``rank``, ``epochs``, ``lr``).

    Returns:
        ``MergedViT`` (one encoder + one head per task), or ``EnsembleViT`` for ``method="ensemble"``.
    """
    # Checked for every method (a typo must not pass silently because this method ignores the value).
    images_per_task = check_int("images_per_task", images_per_task, 1)
    augment_copies = check_int("augment_copies", augment_copies, 0, MAX_AUGMENT_COPIES,
                               hint=" (validation.MAX_AUGMENT_COPIES)")
    seed = check_int("seed", seed, 0, MAX_SEED)
    impl = get_method(method, **({"seed": seed} if "seed" in MERGE_METHODS.options(method) else {}), **kwargs)
    validate_models(models, tasks)
    data = None
    if impl.needs_data:
        data = prepare_data(models, tasks, train_datasets, images_per_task=images_per_task,
                            augment_copies=augment_copies, seed=seed, uses_augmented=impl.uses_augmented)
    start = time.perf_counter()
    result = impl.run(list(models), list(tasks), data)
    result.method = method
    result.sources = [model_source(m) for m in models]
    result.metadata = {
        **result.metadata,
        "method": method,
        "options": impl.options(),
        "images_per_task": images_per_task if impl.needs_data else 0,
        "augment_copies": augment_copies if (impl.needs_data and impl.uses_augmented) else 0,
        "seed": seed,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    result.metadata.setdefault("trainable_parameters", 0)
    return result


# Register the methods (each file declares itself with @register_merge_method).
from . import average, ensemble, fs_merge, kd, permute, regmean  # noqa: E402,F401

__all__ = ["MERGE_METHODS", "EnsembleViT", "MergeMethod", "MergedViT", "get_method", "merge",
           "register_merge_method"]
