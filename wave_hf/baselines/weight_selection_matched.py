"""``weight_selection_matched``: Weight Selection given the same fitting pass as WAVE (issue 8, item 1).

WAVE's fitted models see extra images before fine-tuning (the scaler fit). docs/wave.md section 8 found
that this pass, not the templates, explained much of WAVE's lead over plain Weight Selection, so the fair
baseline gets the same pass: the same images (``training.seeded_subset`` with the same seed), the same
steps and batches (``loop.run_loop``: AdamW without weight decay, cosine, the same seeded batch
stream), the same loss (``CE + kd_weight * KL(p_teacher || p_model) * T^2``, as ``wave_hf.fit``), with
every weight trainable instead of the scalers.

The budget defaults are ``wave_hf.fit.fit_scalers``'s own, read from its signature, so the two cannot
drift apart.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import ViTForImageClassification

from ..distill import distillation_loss
from ..fit import fit_scalers
from ..loop import Cosine, LoopSettings, run_loop
from ..training import (
    check_dataset,
    check_labels,
    dataset_batches,
    dataset_labels,
    forward_output,
    seeded_subset,
)
from .common import load_teacher
from .registry import InitRequest, register_init_method
from .weight_selection import weight_selection

#: The budget and loss options shared with ``fit_scalers``.
FIT_KEYS = ("max_images", "steps", "batch_size", "lr", "kd_weight", "temperature", "warmup_ratio")


#: Every weight trains here, not a few scalers: at 4x64 and 6x128 lr 1e-3 gave a better start than 3e-3,
#: while WAVE's scalers take 1e-2. The budget (images, steps, batch, loss) stays WAVE's.
ALL_WEIGHTS_LR = 1e-3


def fit_defaults() -> dict[str, Any]:
    """``fit_scalers``' defaults for ``FIT_KEYS``, except the learning rate (``ALL_WEIGHTS_LR``)."""
    params = inspect.signature(fit_scalers).parameters
    return {**{k: params[k].default for k in FIT_KEYS}, "lr": ALL_WEIGHTS_LR}


def train_all_weights(
    model: ViTForImageClassification,
    train_dataset: Any,
    *,
    teacher: ViTForImageClassification | None,
    seed: int = 0,
    progress: bool = False,
    **budget: Any,
) -> ViTForImageClassification:
    """Train every weight of ``model`` with WAVE's fitting budget and loss; returns the same model."""
    unknown = sorted(set(budget) - set(FIT_KEYS))
    if unknown:
        raise TypeError(f"unknown fitting options {unknown}; accepted: {sorted(FIT_KEYS)}")
    b = {**fit_defaults(), **budget}
    check_dataset(train_dataset)
    data = seeded_subset(train_dataset, b["max_images"], seed)
    check_labels(dataset_labels(data), model.config.num_labels)
    kd_weight, temperature = float(b["kd_weight"]), float(b["temperature"])
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        if teacher.config.num_labels != model.config.num_labels:
            raise ValueError(f"the teacher predicts {teacher.config.num_labels} labels, the model "
                             f"{model.config.num_labels}: distillation needs the same label space (distill=False)")

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x, y = batch["pixel_values"], batch["labels"]
        logits = m(pixel_values=x).logits
        ce = nn.functional.cross_entropy(logits, y)
        if teacher is None or kd_weight == 0:
            return ce
        with torch.no_grad():
            target = forward_output(teacher.to(x.device), x)
        return ce + kd_weight * distillation_loss(logits, target, None, temperature=temperature, alpha=1.0)

    model.requires_grad_(True)
    settings = LoopSettings(steps=b["steps"], lr=float(b["lr"]), batch_size=b["batch_size"],
                            schedule=Cosine(int(b["warmup_ratio"] * b["steps"])), seed=seed, progress=progress,
                            desc="weight selection (matched)")
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    model, _ = run_loop(model, groups, dataset_batches(data, settings), loss_fn, settings)
    model.eval()
    return model


@register_init_method("weight_selection_matched", needs=("teacher", "train_dataset"),
                      options=FIT_KEYS + ("distill", "progress"),
                      description="Weight Selection + WAVE's fitting pass (same images, steps, loss), all weights")
def weight_selection_matched(req: InitRequest) -> ViTForImageClassification:
    """``distill=False`` drops the KD term (CE only): for transfer to a task the teacher does not know, where
    WAVE's fit must be run the same way. ``FIT_KEYS`` options override ``fit_scalers``' defaults; pass the
    same ones to ``wave_fitted``."""
    opts = req.options
    teacher = load_teacher(req.teacher)
    model = weight_selection(replace(req, teacher=teacher, options={}))
    budget = {k: opts[k] for k in FIT_KEYS if k in opts}
    return train_all_weights(model, req.train_dataset, teacher=teacher if opts.get("distill", True) else None,
                             seed=req.seed, progress=opts.get("progress", False), **budget)
