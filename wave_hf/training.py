"""The resumable ``accelerate`` loop shared by stage 1 (``distill``) and stage 2 (``fit``).

Why a custom loop and not the ``Trainer``: the two stages train a *parametrized* model (weights rebuilt
from templates and scalers at every step) against a frozen teacher, with per-group weight decay, and must
resume bit for bit. The loop is deliberately small:

* **Data order depends only on ``(seed, step)``.** ``StreamBatchSampler`` cuts an endless stream of seeded
  permutations of the dataset into full global batches; every batch is full, and batch ``k`` is the same
  whatever happened before it. A resumed run skips the batches it already did with
  ``accelerate.skip_first_batches`` (indices only: no image is loaded to be thrown away).
* **Global batch = ``batch_size`` on any number of processes.** The ``Accelerator`` splits each batch
  across processes (``split_batches=True``) and DDP averages the gradients, so ``accelerate launch
  --num_processes 2`` trains on the same samples per step as one process (up to float rounding).
* **Checkpoints** are ``wave_hf.checkpoint`` folders ``output_dir/checkpoints/step_XXXXXXXX`` (trainable
  parameters, optimizer, scheduler, RNG, step counter and loss history; safetensors and JSON, never pickle),
  written atomically and stamped with the run's fingerprint; the newest complete one is loaded on start, and
  one written by another run (seed, lr, data, ...) is refused.
* **Finite or fail.** The input batch and the loss are checked at every step and the trained parameters
  before every save and at the end: a NaN/Inf raises ``NonFiniteError`` naming the step and the tensor, and
  nothing is saved for it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub.utils import tqdm
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging

from .checkpoint import CKPT_DIR as CKPT_DIR  # re-exported: public names of this module before checkpoint.py
from .checkpoint import NonFiniteError as NonFiniteError
from .checkpoint import (
    complete_checkpoints,
    dataset_fingerprint,
    ensure_finite,
    ensure_finite_parameters,
    load_latest,
    save_checkpoint,
)
from .data import collate_images as collate

logger = logging.get_logger(__name__)
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


# ----------------------------------------------------------------------------------------------- loop
@dataclass
class LoopSettings:
    """Optimisation and bookkeeping of one run; validated so a bad value fails before any work."""

    steps: int
    batch_size: int = 64
    warmup_steps: int = 0
    seed: int = 0
    output_dir: str | os.PathLike | None = None
    checkpoint_every: int = 0  # 0: only at the end (and at max_steps)
    max_steps: int | None = None  # stop (with a checkpoint) at this global step: for interruption and tests
    keep_checkpoints: int = 2
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("checkpoint_every", 0),
                          ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps - 1] = [0, {self.steps - 1}], "
                             f"got {self.warmup_steps}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be an int >= 1 or None, got {self.max_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0); the message names the value and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


class _Progress:
    """Global step and loss history, saved (as JSON) inside every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"]]


@dataclass
class LoopResult:
    """What a run did: the per-step losses (all of them, across resumes) and where it started and stopped."""

    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    total_steps: int = 0
    resumed_from: int = 0
    stopped_early: bool = False


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (temp, torn and foreign folders are skipped)."""
    return [c.path for c in complete_checkpoints(output_dir)]


LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def run_loop(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    dataset: Any,
    loss_fn: LossFn,
    settings: LoopSettings,
    *,
    lr: float,
    fingerprint: dict[str, Any] | None = None,
) -> tuple[nn.Module, LoopResult]:
    """Train ``model`` in place with AdamW + cosine (linear warm-up); returns the unwrapped model and a log.

    ``param_groups`` are AdamW groups (each may set its own ``weight_decay``). ``loss_fn(model, batch)`` gets
    the prepared (possibly DDP-wrapped) model and this process's share of the batch, already on device.
    ``fingerprint`` (JSON values) identifies the run in its checkpoints, with the loop's own settings (steps,
    batch size, warm-up, seed, lr) and, unless given as ``data``, a hash of ``dataset``: a checkpoint
    written under another fingerprint is refused (``CheckpointMismatchError``). Raises ``NonFiniteError``
    on a NaN/Inf input, loss or trained parameter, before anything is saved.
    """
    set_seed(settings.seed)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    world = accelerator.num_processes
    if settings.batch_size % world:
        raise ValueError(f"batch_size={settings.batch_size} must be divisible by the number of processes ({world}) "
                         "so that every process gets the same share of each global batch")
    groups = [g for g in param_groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    sampler = StreamBatchSampler(len(dataset), settings.batch_size, settings.steps, settings.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    progress = _Progress()

    out_dir = Path(settings.output_dir) if settings.output_dir is not None else None
    result = LoopResult(total_steps=settings.steps)
    run_id: dict[str, Any] = {}
    if out_dir is not None:
        run_id = {**(fingerprint or {}), "steps": settings.steps, "batch_size": settings.batch_size,
                  "warmup_steps": settings.warmup_steps, "seed": settings.seed, "lr": lr}
        if "data" not in run_id:
            run_id["data"] = dataset_fingerprint(dataset)
        last = load_latest(out_dir, run_id, accelerator=accelerator)
        if last is not None:
            progress.load_state_dict(last.restore(model=model, optimizer=optimizer, scheduler=scheduler,
                                                  accelerator=accelerator))
            result.resumed_from = progress.step
            logger.info(f"resumed from {last.path} at step {progress.step}/{settings.steps}")
    hint = f"lower the learning rate (lr={lr}) or check the data"
    hints = {"pixel_values": "check the input data", "loss": hint}

    def save() -> None:
        ensure_finite_parameters(accelerator.unwrap_model(model), step=progress.step, hint=hint)
        if out_dir is None:
            return
        save_checkpoint(out_dir, progress.step, model=model, optimizer=optimizer, scheduler=scheduler,
                        progress_state=progress.state_dict(), fingerprint=run_id, accelerator=accelerator,
                        keep=settings.keep_checkpoints)

    stop_at = settings.steps if settings.max_steps is None else min(settings.steps, settings.max_steps)
    bar = tqdm(total=settings.steps, initial=progress.step, desc=settings.desc,
               disable=not settings.progress or not accelerator.is_local_main_process)
    model.train()
    if progress.step < stop_at:
        for batch in skip_first_batches(loader, progress.step):
            loss = loss_fn(model, batch)
            # one check for both (and one all-reduce under DDP), before backward so nothing is updated
            ensure_finite({"pixel_values": batch["pixel_values"], "loss": loss.detach()}, step=progress.step + 1,
                          total=settings.steps, accelerator=accelerator, hints=hints)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
            bar.update(1)
            bar.set_postfix(loss=f"{progress.losses[-1]:.4g}")
            if progress.step >= stop_at:
                break
            if settings.checkpoint_every and progress.step % settings.checkpoint_every == 0:
                save()
    bar.close()
    save()
    model.eval()
    result.losses = list(progress.losses)
    result.steps_done = progress.step
    result.stopped_early = progress.step < settings.steps
    return accelerator.unwrap_model(model), result


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
