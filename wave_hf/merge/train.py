"""What FS-Merge and KD add to the one loop (``wave_hf.loop``): their options, the reconstruction loss and
the batch order.

Loss: MSE (mean over elements) between the trained module's feature for each image's own task and the
frozen original model's final pre-head feature on that image (targets precomputed once, held in memory).
AdamW (the diagonals of every M/U at ``lr_diag``, the rest at ``lr``) + ``OneCycle`` (pct_start 0.3,
linear anneal, div_factor 25, final_div_factor 1e4), as in the FS-Merge paper's code. The batch order is
by epoch: one seeded permutation per ``(seed, epoch)``, cut into batches of ``batch_size`` with a shorter
last one (``EpochBatchSampler``), so batch ``k`` depends only on ``(seed, k)`` and a resumed run ends
bit-identical to an uninterrupted one. Checkpoints, resume, the finite checks and the process split are the
loop's; a checkpoint's fingerprint adds the method, its options, the trainable layout and a hash of every
training tensor (the targets carry the source models).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import tensors_fingerprint
from ..loop import Batches, LoopResult, LoopSettings, OneCycle, run_loop


@dataclass
class TrainingOptions:
    """The options FS-Merge and KD share: how long and how the reconstruction loop trains (a mixin)."""

    epochs: int = 20
    steps: int | None = None  # overrides epochs when set
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-3
    seed: int = 0
    output_dir: str | None = None  # checkpoints go to output_dir/checkpoints; None: no checkpoints
    save_every: int = 0  # 0: only at the end (and when stopped early)
    resume: bool = True  # resume from the newest checkpoint in output_dir
    stop_after: int | None = None  # stop (with a checkpoint) after this global step; for interruption tests
    progress: bool = True

    def train_config(self, lr_diag: float | None = None) -> TrainConfig:
        """These options as a validated ``TrainConfig`` (``lr_diag`` defaults to ``lr``)."""
        shared = {f.name: getattr(self, f.name) for f in fields(TrainingOptions)}
        return TrainConfig(**shared, lr_diag=self.lr if lr_diag is None else lr_diag)


@dataclass
class TrainConfig(TrainingOptions):
    """``TrainingOptions`` plus what a method or a test may set beyond them (defaults from the FS-Merge
    paper/code); validated here so that a bad merge option fails with its own name before any work."""

    lr_diag: float = 1e-3  # parameters whose name ends in "diag" (the diagonal of every M/U)
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("save_every", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("steps", "stop_after"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {v!r}")
        for name in ("lr", "lr_diag"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        OneCycle(self.pct_start).check(steps=1)  # the loop checks the schedule again with the run's steps

    def total_steps(self, n: int) -> int:
        """``steps``, else ``epochs`` passes over ``n`` images (the last batch of each may be short)."""
        return self.steps if self.steps is not None else self.epochs * math.ceil(n / self.batch_size)


class EpochBatchSampler:
    """``num_batches`` batches over seeded permutations of ``range(n)``: one permutation per epoch (seed
    ``seed * 100003 + epoch``), cut into batches of ``batch_size`` whose last one holds the rest of the epoch.

    Batch ``k`` is a function of ``(seed, k)`` alone, so the loop can resume at any batch. (Unlike the
    ``training.StreamBatchSampler`` of the dataset jobs, an epoch's images are never split across two
    permutations: this is the FS-Merge paper's per-epoch shuffling.)
    """

    def __init__(self, n: int, batch_size: int, num_batches: int, seed: int):
        if n < 1:
            raise ValueError(f"cannot sample batches from an empty set (n={n})")
        self.n, self.batch_size, self.num_batches, self.seed = n, batch_size, num_batches, seed
        self.per_epoch = math.ceil(n / batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.num_batches):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + e))
            yield perm[k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.num_batches


class RoutedTensors:
    """The in-memory training set (images, their task ids, their targets), fetched a whole batch at a time
    (``__getitems__``, which ``DataLoader`` prefers): one gather per tensor instead of one per image."""

    def __init__(self, images: Tensor, task_ids: Tensor, targets: Tensor):
        if not len(images) == len(task_ids) == len(targets):
            raise ValueError(f"{len(images)} images, {len(task_ids)} task ids and {len(targets)} targets: "
                             "one of each per image")
        self.tensors = {"pixel_values": images, "task_ids": task_ids, "targets": targets}

    def __len__(self) -> int:
        return len(self.tensors["pixel_values"])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {key: t[idx] for key, t in self.tensors.items()}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: t[index] for key, t in self.tensors.items()}

    def fingerprint(self) -> str:
        """A hash of every tensor (the names as ``train_reconstruction`` has always recorded them)."""
        t = self.tensors
        return tensors_fingerprint({"images": t["pixel_values"], "task_ids": t["task_ids"], "targets": t["targets"]})


def _whole_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``RoutedTensors.__getitems__`` already returns the collated batch."""
    return batch


def _routed_mse(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return nn.functional.mse_loss(module(batch["pixel_values"], batch["task_ids"]), batch["targets"])


def reconstruction_loss(module: nn.Module, images: Tensor, task_ids: Tensor, targets: Tensor,
                        batch_size: int = 256) -> float:
    """Mean task-routed MSE over a whole set (no grad)."""
    total, n = 0.0, 0
    device = next(module.parameters()).device  # after training the module may sit on a GPU
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            sl = slice(i, i + batch_size)
            out = module(images[sl].to(device), task_ids[sl].to(device))
            total += nn.functional.mse_loss(out, targets[sl].to(device), reduction="sum").item()
            n += out.numel()
    return total / max(n, 1)


def run_fingerprint(module: nn.Module, cfg: TrainConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a reconstruction run in its checkpoints beyond the loop's own fields (steps, batch
    size, seed, lr, schedule, data hash): the caller's fields (method, its options), the trainable layout
    and the settings only this loop has."""
    params = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    layout = json.dumps([[k, list(p.shape), str(p.dtype)] for k, p in params])
    return {
        "method": "reconstruction", **(extra or {}),
        "trainable_parameters": sum(p.numel() for _, p in params),
        "trainable_layout": "sha256:" + hashlib.sha256(layout.encode()).hexdigest()[:16],
        "lr_diag": cfg.lr_diag, "weight_decay": cfg.weight_decay,
    }


def train_reconstruction(module: nn.Module, images: Tensor, task_ids: Tensor, targets: Tensor, cfg: TrainConfig,
                         *, fingerprint: dict[str, Any] | None = None) -> LoopResult:
    """Train ``module(pixel_values, task_ids) -> (B, d)`` to match ``targets`` (in place) with the one loop.

    ``fingerprint``: the caller's fields identifying the run in its checkpoints (e.g. ``{"method": "fs_merge",
    "rank": 8}``), added to ``run_fingerprint``'s. Raises ``CheckpointMismatchError`` on a checkpoint of
    another run and ``NonFiniteError`` on a NaN/Inf input, target, loss or trained parameter.
    """
    data = RoutedTensors(images, task_ids, targets)
    total = cfg.total_steps(len(data))
    trainable = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for k, p in trainable if not k.endswith("diag")], "lr": cfg.lr},
              {"params": [p for k, p in trainable if k.endswith("diag")], "lr": cfg.lr_diag}]
    settings = LoopSettings(
        steps=total, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
        schedule=OneCycle(cfg.pct_start, cfg.div_factor, cfg.final_div_factor), seed=cfg.seed,
        output_dir=cfg.output_dir or None, checkpoint_every=cfg.save_every, max_steps=cfg.stop_after,
        keep_checkpoints=cfg.keep_checkpoints, resume=cfg.resume, progress=cfg.progress, desc="merge")
    batches = Batches(dataset=data, sampler=EpochBatchSampler(len(data), cfg.batch_size, total, cfg.seed),
                      collate_fn=_whole_batch, fingerprint=data.fingerprint,
                      checks={"pixel_values": "check the merge images", "targets": "check the source models"})
    _, result = run_loop(module, groups, batches, _routed_mse, settings,
                         fingerprint=run_fingerprint(module, cfg, fingerprint))
    return result
