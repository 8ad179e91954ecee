"""``weight_selection_matched``: Weight Selection given the same fitting pass as WAVE (issue 8, item 1).

WAVE's fitted models see extra images before fine-tuning (the scaler fit). docs/wave.md section 8 found
that this pass, not the templates, explained much of WAVE's lead over plain Weight Selection, so the fair
baseline gets the same pass: the same images (``training.seeded_subset`` with the same seed), the same
steps and batches (``loop.run_loop``: AdamW without weight decay, cosine, the same seeded batch
stream), the same loss (``wave_hf.fit.TeacherSignal``: ``CE + kd_weight * KL(p_teacher || p_model) * T^2``,
plus the teacher's features when it has no logits for the labels or when feature weights are set), with
every weight trainable instead of the scalers. Features are compared through a linear map that starts at
Weight Selection's own unit correspondence (target unit ``i`` is teacher unit ``uniform_indices(...)[i]``).

The budget defaults are ``wave_hf.fit.FitConfig``'s own, so the two cannot
drift apart.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import ViTForImageClassification

from ..fit import FeatureStudent, FitConfig, TeacherSignal
from ..loop import Cosine, LoopSettings, run_loop
from ..teachers import load_teacher
from ..training import check_dataset, check_labels, dataset_batches, dataset_labels, seeded_subset
from .registry import InitRequest, register_init_method
from .weight_selection import uniform_indices, weight_selection

#: The budget and loss options shared with ``fit_scalers``.
FIT_KEYS = ("max_images", "steps", "batch_size", "lr", "kd_weight", "temperature", "warmup_ratio", "teacher_head",
            "feature_weight", "layer_weight")


#: Every weight trains here, not a few scalers: at 4x64 and 6x128 lr 1e-3 gave a better start than 3e-3,
#: while WAVE's scalers take 1e-2. The budget (images, steps, batch, loss) stays WAVE's.
ALL_WEIGHTS_LR = 1e-3


def fit_defaults() -> dict[str, Any]:
    """``FitConfig``'s defaults for ``FIT_KEYS``, except the learning rate (``ALL_WEIGHTS_LR``)."""
    defaults = FitConfig().to_dict()
    return {**{k: defaults[k] for k in FIT_KEYS}, "lr": ALL_WEIGHTS_LR}


def selection_projection(width: int, teacher_width: int) -> nn.Linear:
    """``width -> teacher_width`` map starting at Weight Selection's correspondence (unit ``i`` was selected
    from teacher unit ``uniform_indices(teacher_width, width)[i]``)."""
    out = nn.Linear(width, teacher_width, bias=False)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[uniform_indices(teacher_width, width), torch.arange(width)] = 1.0
    return out


def train_all_weights(
    model: ViTForImageClassification,
    train_dataset: Any,
    *,
    teacher: Any,
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
    kd_weight = float(b["kd_weight"])
    signal = TeacherSignal.resolve(teacher if kd_weight > 0 else None, model.config, head=b["teacher_head"],
                                   kd_weight=kd_weight, temperature=float(b["temperature"]),
                                   feature_weight=b["feature_weight"], layer_weight=b["layer_weight"])
    model.requires_grad_(True)
    trained = signal.student(model, lambda: selection_projection(model.config.hidden_size,
                                                                 signal.teacher.shape.width))
    settings = LoopSettings(steps=b["steps"], lr=float(b["lr"]), batch_size=b["batch_size"],
                            schedule=Cosine(int(b["warmup_ratio"] * b["steps"])), seed=seed, progress=progress,
                            desc="weight selection (matched)")
    groups = [{"params": list(trained.parameters()), "weight_decay": 0.0}]
    trained, _ = run_loop(trained, groups, dataset_batches(data, settings), signal.loss_fn(model.config.num_hidden_layers),
                          settings)
    model = trained.model if isinstance(trained, FeatureStudent) else trained
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
    teacher = load_teacher(req.teacher, image_size=req.image_size)
    model = weight_selection(replace(req, teacher=teacher, options={}))
    budget = {k: opts[k] for k in FIT_KEYS if k in opts}
    return train_all_weights(model, req.train_dataset, teacher=teacher if opts.get("distill", True) else None,
                             seed=req.seed, progress=opts.get("progress", False), **budget)
