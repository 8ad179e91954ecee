"""The one resumable training loop: distillation, scaler fitting, budget-matched Weight Selection, FS-Merge and KD.

Why a custom loop and not the ``Trainer``: these jobs train a *parametrized* or task-routed model (weights
rebuilt from templates and scalers at every step, or one feature per image's own task) against frozen
targets, with per-group learning rates and weight decay, and must resume bit for bit. Fine-tuning a plain
ViT stays the stock ``Trainer`` (``wave_hf.train``). A caller gives the model, its parameter groups, a
``Batches`` source, a loss function, ``LoopSettings`` (with a ``Cosine`` or ``OneCycle`` schedule) and the
fields that identify its run; the loop owns everything else, once:

* **The only ``Accelerator``** of the package (``split_batches=True``): ``batch_size`` is the *global*
  batch on any number of processes, each process takes a contiguous share of every batch and DDP averages
  the gradients, so ``accelerate launch --num_processes 2`` trains on the same samples per step as one
  process (up to float rounding), and a prepared scheduler steps once per global step.
* **Data order depends only on ``(seed, step)``.** ``Batches.sampler`` yields the global batches as index
  lists; a resumed run starts at batch ``k`` by index (no image is loaded to be thrown away). The loop does
  the split itself rather than through a prepared ``DataLoader``, because accelerate's split drops the short
  batch that ends each epoch of an epoch-based order (FS-Merge's) instead of splitting it.
* **Checkpoints** are ``wave_hf.checkpoint`` folders ``output_dir/checkpoints/step_XXXXXXXX`` (trainable
  parameters, optimizer, scheduler, RNG, step counter and loss history; safetensors and JSON, never pickle),
  written atomically every ``checkpoint_every`` steps and at the end, pruned to the newest
  ``keep_checkpoints``, and stamped with the run's fingerprint (the caller's fields, the loop's settings and
  a hash of the data); the newest complete one is loaded on start, and one written by another run is refused.
* **Finite or fail.** The checked batch tensors and the loss are checked at every step, before backward,
  and the trained parameters before every save: a NaN/Inf raises ``NonFiniteError`` naming the step and the
  tensor, and nothing is saved for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, send_to_device, set_seed
from huggingface_hub.utils import tqdm
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging

from .checkpoint import ensure_finite, ensure_finite_parameters, load_latest, save_checkpoint

logger = logging.get_logger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


# ------------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Cosine:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 (distill, fit, matched Weight Selection)."""

    warmup_steps: int = 0

    def check(self, steps: int) -> None:
        """The warm-up must leave at least one decaying step."""
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < steps:
            raise ValueError(f"warmup_steps must be in [0, steps - 1] = [0, {steps - 1}], got {w!r}")

    def build(self, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        return get_cosine_schedule_with_warmup(optimizer, self.warmup_steps, steps)

    def fingerprint(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps}


@dataclass(frozen=True)
class OneCycle:
    """``OneCycleLR`` with a linear anneal; every parameter group peaks at its own ``lr`` (FS-Merge and KD,
    with the FS-Merge paper's defaults)."""

    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def check(self, steps: int) -> None:
        """``OneCycleLR`` would accept a ``pct_start`` outside (0, 1) and then divide by zero mid-run."""
        if not (isinstance(self.pct_start, (int, float)) and 0 < self.pct_start < 1):
            raise ValueError(f"pct_start must be in (0, 1), got {self.pct_start!r}")

    def build(self, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=steps,
            pct_start=self.pct_start, anneal_strategy="linear", div_factor=self.div_factor,
            final_div_factor=self.final_div_factor)

    def fingerprint(self) -> dict[str, Any]:
        return {"pct_start": self.pct_start, "div_factor": self.div_factor, "final_div_factor": self.final_div_factor}


Schedule = Cosine | OneCycle


# ------------------------------------------------------------------------------------------- settings
@dataclass
class LoopSettings:
    """Optimisation and bookkeeping of one run (AdamW + ``schedule``); validated so a bad value fails before
    any work. ``lr`` and ``weight_decay`` apply to the parameter groups that do not set their own."""

    steps: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.0
    schedule: Schedule = field(default_factory=Cosine)
    seed: int = 0
    output_dir: str | os.PathLike | None = None  # checkpoints go to output_dir/checkpoints; None: none
    checkpoint_every: int = 0  # 0: only at the end (and at max_steps)
    max_steps: int | None = None  # stop (with a checkpoint) at this global step: for interruption and tests
    keep_checkpoints: int = 2
    resume: bool = True  # resume from the newest checkpoint; False: start afresh and overwrite
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 0), ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"max_steps must be an int >= 1 or None, got {self.max_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        self.schedule.check(self.steps)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change what a run computes (not where it saves or how often)."""
        return {"steps": self.steps, "batch_size": self.batch_size, "seed": self.seed, "lr": self.lr,
                **self.schedule.fingerprint()}


# ---------------------------------------------------------------------------------------------- batches
class BatchSampler(Protocol):
    """The global batches of a run as index lists, ``len`` of them; batch ``k`` depends only on ``(seed, k)``."""

    def __iter__(self) -> Iterator[list[int]]: ...

    def __len__(self) -> int: ...


@dataclass
class Batches:
    """Where a run's batches come from.

    ``dataset`` is map-style (``__getitems__`` is used when it has one, as ``DataLoader`` does), ``sampler``
    gives the global batches (exactly ``LoopSettings.steps`` of them), ``collate_fn`` turns the fetched items
    into a dict of tensors. ``fingerprint`` hashes the data for the checkpoints (called only when there are
    checkpoints: it costs a pass over part of the data). ``checks`` maps the batch tensors to check for
    NaN/Inf at every step to what the message tells the user to do.
    """

    dataset: Any
    sampler: BatchSampler
    collate_fn: Callable[[Any], dict[str, Tensor]]
    fingerprint: Callable[[], str]
    checks: Mapping[str, str]


class _Share:
    """This process's contiguous share of every global batch from batch ``start`` on: for a full batch exactly
    accelerate's ``split_batches`` split. A short batch is split as evenly as it goes; when its size is not a
    multiple of the process count, DDP's mean of per-process means weights its items slightly unequally."""

    def __init__(self, sampler: BatchSampler, start: int, rank: int, world: int):
        self.sampler, self.start, self.rank, self.world = sampler, start, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for k, batch in enumerate(islice(self.sampler, self.start, None), self.start):
            if len(batch) < self.world:  # every process sees the same batch, so all raise together
                raise ValueError(f"batch {k + 1} holds {len(batch)} item(s), fewer than the {self.world} processes: "
                                 "every process needs at least one; change batch_size or the number of images")
            size, extra = divmod(len(batch), self.world)
            lo = self.rank * size + min(self.rank, extra)
            yield batch[lo : lo + size + (self.rank < extra)]

    def __len__(self) -> int:
        return len(self.sampler) - self.start


# ------------------------------------------------------------------------------------------- progress
class _Progress:
    """Global step and loss history, saved (as JSON) inside every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.losses = [float(v) for v in state.get("losses", [])]


@dataclass
class LoopResult:
    """What a run did: the per-step losses (all of them, across resumes; the mean over processes), where it
    started and stopped, and on how many processes the last part ran."""

    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    total_steps: int = 0
    resumed_from: int = 0
    stopped_early: bool = False
    num_processes: int = 1


def _lr_hint(groups: Sequence[Mapping[str, Any]], default: float) -> str:
    lrs = list(dict.fromkeys(float(g.get("lr", default)) for g in groups))
    return f"lower the learning rate (lr={', '.join(f'{lr:g}' for lr in lrs)}) or check the data"


# ----------------------------------------------------------------------------------------------- loop
def run_loop(
    model: nn.Module,
    param_groups: Sequence[dict[str, Any]],
    batches: Batches,
    loss_fn: LossFn,
    settings: LoopSettings,
    *,
    fingerprint: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, LoopResult]:
    """Train ``model`` in place; returns the unwrapped model (on the accelerator's device) and a log.

    ``param_groups`` are AdamW groups (each may set its own ``lr`` and ``weight_decay``; empty ones are
    dropped). ``loss_fn(model, batch)`` gets the prepared (possibly DDP-wrapped) model and this process's
    share of the batch, already on device. ``fingerprint`` (JSON values) identifies the run in its
    checkpoints, with ``settings.fingerprint()`` and, unless given as ``data``, ``batches.fingerprint()``: a
    checkpoint written under another fingerprint is refused (``CheckpointMismatchError``). Raises
    ``NonFiniteError`` on a NaN/Inf checked input, loss or trained parameter, before anything is saved.
    """
    set_seed(settings.seed)
    if len(batches.sampler) != settings.steps:
        raise ValueError(f"the batch sampler yields {len(batches.sampler)} batches for {settings.steps} steps")
    groups = [g for g in param_groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    hint = _lr_hint(groups, settings.lr)
    # split_batches: batch_size is the global batch, and a prepared scheduler steps once per global step
    # (without it accelerate advances it num_processes times per step).
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    rank, world = accelerator.process_index, accelerator.num_processes
    if settings.batch_size % world:
        raise ValueError(f"batch_size={settings.batch_size} must be divisible by the number of processes ({world}) "
                         "so that every process gets the same share of each global batch")
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = settings.schedule.build(optimizer, settings.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = _Progress()

    out_dir = Path(settings.output_dir) if settings.output_dir is not None else None
    result = LoopResult(total_steps=settings.steps, num_processes=world)
    run_id: dict[str, Any] = {}
    if out_dir is not None:  # hashing the data costs a little: only when checkpointing
        run_id = {**(fingerprint or {}), **settings.fingerprint()}
        if "data" not in run_id:
            run_id["data"] = batches.fingerprint()
        last = load_latest(out_dir, run_id, accelerator=accelerator) if settings.resume else None
        if last is not None:
            progress.load_state_dict(last.restore(model=model, optimizer=optimizer, scheduler=scheduler,
                                                  accelerator=accelerator))
            result.resumed_from = progress.step
            logger.info(f"resumed from {last.path} at step {progress.step}/{settings.steps}")
    hints = {**batches.checks, "loss": hint}

    def save() -> None:
        ensure_finite_parameters(accelerator.unwrap_model(model), step=progress.step, hint=hint)
        if out_dir is None:
            return
        save_checkpoint(out_dir, progress.step, model=model, optimizer=optimizer, scheduler=scheduler,
                        progress_state=progress.state_dict(), fingerprint=run_id, accelerator=accelerator,
                        keep=settings.keep_checkpoints, overwrite=not settings.resume)

    stop_at = settings.steps if settings.max_steps is None else min(settings.steps, settings.max_steps)
    # a private generator: the loader's base seed must not draw from the global RNG (saved in checkpoints)
    loader = DataLoader(batches.dataset, batch_sampler=_Share(batches.sampler, progress.step, rank, world),
                        collate_fn=batches.collate_fn, num_workers=0,
                        generator=torch.Generator().manual_seed(settings.seed))
    bar = tqdm(total=settings.steps, initial=progress.step, desc=settings.desc,
               disable=not settings.progress or not accelerator.is_local_main_process)
    model.train()
    if progress.step < stop_at:
        for batch in loader:
            batch = send_to_device(batch, accelerator.device)
            loss = loss_fn(model, batch)
            # one check for all (and one all-reduce under DDP), before backward so nothing is updated
            ensure_finite({**{k: batch[k] for k in batches.checks}, "loss": loss.detach()}, step=progress.step + 1,
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
