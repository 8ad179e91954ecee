"""The task-routed feature-reconstruction loop shared by FS-Merge and KD (an ``accelerate`` loop).

Loss: MSE (mean over elements) between the trained module's feature for each image's own task and the
frozen original model's final pre-head feature on that image (targets precomputed once). AdamW +
OneCycleLR (pct_start 0.3, linear anneal, div_factor 25, final_div_factor 1e4). The batch order depends
only on ``(seed, epoch)``, so a run resumed from a checkpoint (``wave_hf.checkpoint``: safetensors and JSON,
written atomically, under ``output_dir/checkpoints/step_XXXXXXXX``) ends bit-identical to an uninterrupted
one. A checkpoint records the run's fingerprint (method, options, seed, lrs, batch size, total steps and a
hash of every training tensor); another run refuses it. A NaN/Inf input, target, loss or trained parameter
stops the run with ``NonFiniteError`` before anything is saved.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub.utils import tqdm
from torch import nn
from transformers.utils import logging

from ..checkpoint import (
    ensure_finite,
    ensure_finite_parameters,
    load_latest,
    save_checkpoint,
    tensors_fingerprint,
)
from ..training import LoopResult

logger = logging.get_logger(__name__)


@dataclass
class TrainingOptions:
    """The options FS-Merge and KD share: how long and how the reconstruction loop trains (a mixin)."""

    epochs: int = 20
    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-3
    seed: int = 0
    output_dir: str | None = None
    save_every: int = 0
    resume: bool = True
    stop_after: int | None = None
    progress: bool = True

    def train_config(self, lr_diag: float | None = None) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           lr_diag=self.lr if lr_diag is None else lr_diag, weight_decay=self.weight_decay,
                           seed=self.seed, output_dir=self.output_dir, save_every=self.save_every,
                           resume=self.resume, stop_after=self.stop_after, progress=self.progress)

@dataclass
class TrainConfig:
    """Optimisation settings of the reconstruction loop (defaults from the FS-Merge paper/code)."""

    epochs: int = 20
    steps: int | None = None  # overrides epochs when set
    batch_size: int = 64
    lr: float = 1e-4
    lr_diag: float = 1e-3  # parameters whose name ends in "diag" (the diagonal of every M/U)
    weight_decay: float = 1e-3
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    seed: int = 0
    output_dir: str | None = None  # checkpoints go to output_dir/checkpoints; None: no checkpoints
    save_every: int = 0  # 0: only at the end (and when stopped early)
    resume: bool = True  # resume from the newest checkpoint in output_dir
    stop_after: int | None = None  # stop (with a checkpoint) after this global step; for interruption tests
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1 or None, got {self.steps!r}")
        for name in ("lr", "lr_diag"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (0 < self.pct_start < 1):
            raise ValueError(f"pct_start must be in (0, 1), got {self.pct_start}")


class _Counter:
    """Global step and loss history, saved (as JSON) inside every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.losses = [float(v) for v in state.get("losses", [])]


def reconstruction_loss(module: nn.Module, images: torch.Tensor, task_ids: torch.Tensor, targets: torch.Tensor,
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


def run_fingerprint(module: nn.Module, images: torch.Tensor, task_ids: torch.Tensor, targets: torch.Tensor,
                    cfg: TrainConfig, total: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a reconstruction run in its checkpoints: the caller's fields (method, its options), the
    optimisation settings, the trainable layout and a hash of every training tensor (the targets carry the
    source models)."""
    params = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    layout = json.dumps([[k, list(p.shape), str(p.dtype)] for k, p in params])
    return {
        "method": "reconstruction", **(extra or {}),
        "trainable_parameters": sum(p.numel() for _, p in params),
        "trainable_layout": "sha256:" + hashlib.sha256(layout.encode()).hexdigest()[:16],
        "seed": cfg.seed, "lr": cfg.lr, "lr_diag": cfg.lr_diag, "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size, "total_steps": total, "pct_start": cfg.pct_start,
        "div_factor": cfg.div_factor, "final_div_factor": cfg.final_div_factor,
        "data": tensors_fingerprint({"images": images, "task_ids": task_ids, "targets": targets}),
    }


def train_reconstruction(module: nn.Module, images: torch.Tensor, task_ids: torch.Tensor, targets: torch.Tensor,
                         cfg: TrainConfig, *, fingerprint: dict[str, Any] | None = None) -> LoopResult:
    """Train ``module(pixel_values, task_ids) -> (B, d)`` to match ``targets`` (in place).

    ``fingerprint``: the caller's fields identifying the run in its checkpoints (e.g. ``{"method": "fs_merge",
    "rank": 8}``), added to ``run_fingerprint``'s. Raises ``CheckpointMismatchError`` on a checkpoint of
    another run and ``NonFiniteError`` on a NaN/Inf input, target, loss or trained parameter.
    """
    set_seed(cfg.seed)
    n = len(images)
    spe = math.ceil(n / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    params = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters")
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    run_id = run_fingerprint(module, images, task_ids, targets, cfg, total, fingerprint) if out_dir else {}
    diag = [p for k, p in params if k.endswith("diag")]
    rest = [p for k, p in params if not k.endswith("diag")]
    groups = [g for g in ({"params": rest, "lr": cfg.lr}, {"params": diag, "lr": cfg.lr_diag}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=total, pct_start=cfg.pct_start,
        anneal_strategy="linear", div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor)
    # split_batches: batch_size is the global batch, and the scheduler steps once per global step
    # (without it accelerate advances a prepared scheduler num_processes times per step).
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    counter = _Counter()
    result = LoopResult(total_steps=total)
    if out_dir is not None and cfg.resume:
        last = load_latest(out_dir, run_id, accelerator=accelerator)
        if last is not None:
            counter.load_state_dict(last.restore(model=module, optimizer=optimizer, scheduler=scheduler,
                                                 accelerator=accelerator))
            result.resumed_from = counter.step
            logger.info(f"resumed from {last.path} at step {counter.step}/{total}")
    hint = f"lower the learning rates (lr={cfg.lr}, lr_diag={cfg.lr_diag})"
    hints = {"pixel_values": "check the merge images", "targets": "check the source models", "loss": hint}

    def save() -> None:
        ensure_finite_parameters(accelerator.unwrap_model(module), step=counter.step, hint=hint)
        if out_dir is None:
            return
        save_checkpoint(out_dir, counter.step, model=module, optimizer=optimizer, scheduler=scheduler,
                        progress_state=counter.state_dict(), fingerprint=run_id, accelerator=accelerator,
                        keep=cfg.keep_checkpoints, overwrite=not cfg.resume)

    device = accelerator.device
    module.train()
    bar = tqdm(total=total, initial=counter.step, desc="merge", disable=not cfg.progress
               or not accelerator.is_local_main_process)
    while counter.step < total:
        step = counter.step
        epoch, k = divmod(step, spe)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        idx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size][rank::world]  # this rank's share
        x, t, y = images[idx].to(device), task_ids[idx].to(device), targets[idx].to(device)
        loss = nn.functional.mse_loss(module(x, t), y)
        ensure_finite({"pixel_values": x, "targets": y, "loss": loss.detach()}, step=step + 1, total=total,
                      accelerator=accelerator, hints=hints)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        counter.step += 1
        counter.losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{counter.losses[-1]:.4g}")
        if cfg.save_every and counter.step % cfg.save_every == 0 and counter.step < total:
            save()
        if cfg.stop_after is not None and counter.step >= cfg.stop_after and counter.step < total:
            result.stopped_early = True
            break
    bar.close()
    save()
    result.losses = list(counter.losses)
    result.steps_done = counter.step
    module.eval()
    return result
