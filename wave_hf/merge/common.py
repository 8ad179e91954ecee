"""Shared pieces of the merge methods: input validation, merge images, feature extraction, weight stacks.

Everything here is method-agnostic; every key name and module path comes from ``wave_hf.vit_layout``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from .. import vit_layout as L
from ..validation import check_unique_names

# Config fields that must agree for models to be merged into one architecture.
ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
)


def validate_models(models: Sequence[nn.Module], tasks: Sequence[str]) -> ViTConfig:
    """Check the N source models and task names; return the shared config. Raises with a clear message."""
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a list of ViTForImageClassification, got {type(models).__name__}")
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models (N >= 2), got N={len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, ViTForImageClassification):
            raise TypeError(f"models[{i}] must be a ViTForImageClassification, got {type(m).__name__}")
    tasks = check_unique_names(tasks, "task name")  # they become folder names when the merge is saved
    if len(tasks) != len(models):
        raise ValueError(f"got {len(models)} models but {len(tasks)} task names; give one task name per model")
    ref = models[0].config
    for i, m in enumerate(models[1:], start=1):
        for field in ARCH_FIELDS:
            a, b = getattr(ref, field, None), getattr(m.config, field, None)
            if a != b:
                raise ValueError(
                    f"models have different architectures: config.{field} is {a!r} in models[0] "
                    f"({tasks[0]!r}) but {b!r} in models[{i}] ({tasks[i]!r})"
                )
    if ref.hidden_size % ref.num_attention_heads:
        raise ValueError(
            f"hidden_size={ref.hidden_size} is not divisible by num_attention_heads={ref.num_attention_heads}"
        )
    L.shape_of(ref)  # integer MLP ratio
    return ref


def model_source(model: nn.Module) -> str:
    """A human-readable id or path of a source model (for ``base_model`` in the card)."""
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def images_of(dataset, limit: int | None = None, *, seed: int = 0, task: str = "?") -> torch.Tensor:
    """First ``limit`` images (after a seeded shuffle) of a dataset as one float tensor (n, C, H, W).

    Accepts a tensor (n, C, H, W), a ``datasets.Dataset`` / list of ``{"pixel_values": ...}`` items,
    or a list of (C, H, W) tensors.
    """
    if dataset is None:
        raise ValueError(f"task {task!r} has no images: pass one dataset per task")
    if isinstance(dataset, torch.Tensor):
        n = dataset.shape[0]
        getter = lambda i: dataset[i]  # noqa: E731
    else:
        n = len(dataset)

        def getter(i):
            item = dataset[int(i)]
            px = item["pixel_values"] if isinstance(item, dict) else item
            return torch.as_tensor(px, dtype=torch.float32)

    if n == 0 or (limit is not None and limit <= 0):
        raise ValueError(f"task {task!r} has no images (got {n} images, images_per_task={limit})")
    k = n if limit is None else min(limit, n)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    out = torch.stack([getter(i) for i in idx.tolist()]).float()
    if out.ndim != 4:
        raise ValueError(f"task {task!r}: images must be (C, H, W), got a batch of shape {tuple(out.shape)}")
    return out


def check_images(images: Sequence[torch.Tensor], tasks: Sequence[str], config: ViTConfig) -> None:
    if len(images) != len(tasks):
        raise ValueError(f"got {len(tasks)} tasks but {len(images)} datasets; give one dataset per task")
    want = (config.num_channels, config.image_size, config.image_size)
    for t, x in zip(tasks, images):
        if x.shape[0] == 0:
            raise ValueError(f"task {t!r} has no images")
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"task {t!r}: images have shape {tuple(x.shape[1:])}, the models expect {want}")
        if not torch.isfinite(x).all():
            raise ValueError(f"task {t!r}: images contain NaN or Inf")


def augment(images: torch.Tensor, copies: int, *, max_shift: int = 2, seed: int = 0) -> torch.Tensor:
    """``copies`` shifted copies of each image: zero-pad by ``max_shift`` and crop at a random offset.

    Deterministic (own generator), no flips (digits are not flip-invariant). Returns (copies*n, C, H, W).
    """
    if copies <= 0:
        return images[:0]
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    p = max_shift
    padded = nn.functional.pad(images, (p, p, p, p))
    out = []
    for _ in range(copies):
        offs = torch.randint(0, 2 * p + 1, (n, 2), generator=g)
        out.append(torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(offs.tolist())]))
    return torch.cat(out)


@dataclass
class MergeData:
    """Merge images per task: originals and the offline augmented copies."""

    originals: list[torch.Tensor]
    augmented: list[torch.Tensor]

    def all_images(self) -> list[torch.Tensor]:
        return [torch.cat([o, a]) for o, a in zip(self.originals, self.augmented)]


@torch.no_grad()
def features(model: ViTForImageClassification, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Final pre-head feature: the CLS token after the final LayerNorm, (n, d)."""
    model.eval()
    enc = L.encoder(model)
    out = [enc(pixel_values=images[i : i + batch_size]).last_hidden_state[:, 0] for i in
           range(0, len(images), batch_size)]
    return torch.cat(out)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Encoder tensors of a ViT by full key (classifier excluded), detached copies."""
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in L.encoder_keys(model.config.num_hidden_layers)}


def head_state(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    sd = model.state_dict()
    w, b = (sd[k].detach().clone() for k in L.classifier_keys())
    return w, b


def id2label_of(model: nn.Module) -> dict[int, str]:
    n = model.config.num_labels
    raw = getattr(model.config, "id2label", None) or {}
    return {int(k): str(v) for k, v in raw.items()} if len(raw) == n else {i: str(i) for i in range(n)}


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def routed_targets(models, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate every task's images, their task ids, and model i's features on task i's images (once)."""
    x = torch.cat(images)
    ids = torch.cat([torch.full((len(im),), i, dtype=torch.long) for i, im in enumerate(images)])
    y = torch.cat([features(m, im) for m, im in zip(models, images)])
    return x, ids, y
