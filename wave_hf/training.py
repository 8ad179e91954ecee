"""The data side of the loop jobs (distill, fit, matched Weight Selection): dataset checks, labels, seeded
subsets, the seeded batch stream, the ``Batches`` source the loop (``wave_hf.loop``) trains on, and
prediction over a whole dataset.

Why a stream and not epochs: ``StreamBatchSampler`` cuts an endless stream of seeded permutations of the
dataset into full global batches, so every batch is full (a small set simply wraps) and batch ``k`` is the
same whatever happened before it; a resumed run starts at batch ``k`` by index. The checkpoint fingerprint
of a dataset is ``checkpoint.dataset_fingerprint``: a few items and the labels, not every image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from .checkpoint import dataset_fingerprint
from .data import collate_images as collate
from .loop import Batches, LoopSettings

LABEL_KEYS = ("labels", "label")


# ----------------------------------------------------------------------------------------------- data
def _label_column(dataset: Any) -> list[int] | None:
    """The raw label column of a ``datasets.Dataset`` without decoding any image, or None."""
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return None
    if not isinstance(dataset, Dataset):
        return None
    raw = dataset.with_format(None)
    for key in LABEL_KEYS:
        if key in raw.column_names:
            return [int(v) for v in raw[key]]
    return None


def dataset_labels(dataset: Any) -> list[int]:
    """Every label of ``dataset`` (read from the column when possible, else item by item)."""
    column = _label_column(dataset)
    if column is not None:
        return column
    labels = []
    for start in range(0, len(dataset), 256):
        labels += collate([dataset[i] for i in range(start, min(start + 256, len(dataset)))])["labels"].tolist()
    return labels


def dataset_num_labels(dataset: Any) -> tuple[int | None, dict[int, str] | None]:
    """``(num_classes, id2label)`` from a ``ClassLabel`` feature named ``labels``/``label``, else ``(None, None)``."""
    features = getattr(dataset, "features", None)
    if not features:
        return None, None
    for key in LABEL_KEYS:
        feat = features.get(key) if hasattr(features, "get") else None
        if feat is not None and hasattr(feat, "num_classes") and hasattr(feat, "names"):
            return int(feat.num_classes), dict(enumerate(feat.names))
    return None, None


def check_dataset(dataset: Any, name: str = "train_dataset") -> None:
    """Fail early, with the reason, on something that is not a non-empty dataset of labelled images."""
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{name} must be a map-style dataset (len and [i]), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: training needs at least one labelled image")
    collate([dataset[0]])  # raises with the keys found when pixel_values or labels are missing


def check_labels(labels: Sequence[int], num_labels: int, name: str = "train_dataset") -> None:
    """Every label must index a logit: ``0 <= label < num_labels``."""
    if not labels:
        raise ValueError(f"{name} is empty: training needs at least one labelled image")
    low, high = min(labels), max(labels)
    if low < 0 or high >= num_labels:
        bad = low if low < 0 else high
        raise ValueError(f"{name} has label {bad}, outside the accepted range [0, {num_labels - 1}] "
                         f"(num_labels={num_labels})")


def seeded_subset(dataset: Any, max_images: int | None, seed: int) -> Any:
    """At most ``max_images`` items, chosen by a seeded permutation (the whole set when it is smaller)."""
    n = len(dataset)
    if max_images is None or max_images >= n:
        return dataset
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values.tolist()
    return dataset.select(idx) if hasattr(dataset, "select") else Subset(dataset, idx)


class StreamBatchSampler:
    """``num_batches`` full batches cut from an endless stream of seeded permutations of ``range(n)``.

    Batch ``k`` covers stream positions ``[k*B, (k+1)*B)``; permutation ``e`` uses seed ``(seed, e)``. Every
    batch is full (a small set simply wraps), and any batch is a function of ``(seed, k)`` alone.
    """

    def __init__(self, n: int, batch_size: int, num_batches: int, seed: int):
        if n < 1:
            raise ValueError(f"cannot sample batches from an empty dataset (n={n})")
        self.n, self.batch_size, self.num_batches, self.seed = n, batch_size, num_batches, seed
        self.drop_last = False

    def _perm(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm, pos = 0, self._perm(0), 0
        for _ in range(self.num_batches):
            batch: list[int] = []
            while len(batch) < self.batch_size:
                if pos == self.n:
                    epoch, pos = epoch + 1, 0
                    perm = self._perm(epoch)
                take = min(self.batch_size - len(batch), self.n - pos)
                batch += perm[pos : pos + take].tolist()
                pos += take
            yield batch

    def __len__(self) -> int:
        return self.num_batches


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0); the message names the value and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def dataset_batches(dataset: Any, settings: LoopSettings) -> Batches:
    """The loop's batches over a map-style image dataset: ``settings.steps`` full global batches of the seeded
    stream (``StreamBatchSampler``), collated to ``{"pixel_values", "labels"}``; the pixels are checked."""
    return Batches(dataset=dataset,
                   sampler=StreamBatchSampler(len(dataset), settings.batch_size, settings.steps, settings.seed),
                   collate_fn=collate, fingerprint=lambda: dataset_fingerprint(dataset),
                   checks={"pixel_values": "check the input data"})


@torch.no_grad()
def predict(model: nn.Module, dataset: Any, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(outputs, labels)`` over a whole dataset, in order; ``outputs`` are logits (or CLS features)."""
    model.eval()
    device = next(model.parameters()).device  # a model trained on a GPU stays there; the loader yields CPU
    outs, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    for batch in loader:
        outs.append(forward_output(model, batch["pixel_values"].to(device)).cpu())
        labels.append(batch["labels"])
    return torch.cat(outs), torch.cat(labels)


def forward_output(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Logits of a classifier; the final CLS feature of a headless ``ViTModel``."""
    out = model(pixel_values=pixel_values)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state[:, 0]


def top1(logits: Tensor, labels: Tensor) -> float:
    """The fraction of rows whose largest logit is the label: the one accuracy every report uses."""
    return int((logits.argmax(-1) == labels).sum()) / max(len(labels), 1)  # exact: correct / total


def accuracy(model: nn.Module, dataset: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on a dataset of ``pixel_values``/``labels`` items (on its device)."""
    logits, labels = predict(model, dataset, batch_size)
    return top1(logits, labels)
