"""``weight_selection_matched``: Weight Selection given the same fitting pass as WAVE (issue 8, item 1).

WAVE's fitted models see extra images before fine-tuning (the scaler fit). docs/wave.md section 8 found
that this pass, not the templates, explained much of WAVE's lead over plain Weight Selection, so the fair
baseline gets the same pass: the same images (``training.seeded_subset``), the same number of steps and
batches (``training.run_loop``: AdamW, cosine, the same seeded batch stream), the same loss
(``distill.distillation_loss``: KD from the teacher plus CE), with every weight trainable.

The hyper-parameters default to ``wave_hf.fit.fit_scalers``'s own defaults, read from its signature, so
that the two cannot drift apart; the constants below are used only while ``wave_hf.fit`` is missing.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import ViTForImageClassification

from ..distill import distillation_loss
from ..training import LoopSettings, check_dataset, run_loop, seeded_subset
from .common import load_teacher, reject_unknown
from .registry import register_init_method
from .weight_selection import weight_selection

#: Fallback fitting budget (docs/wave.md section 5 item 7, issue 5): used only if ``wave_hf.fit`` is absent.
FALLBACK_FIT = {"max_images": 1000, "steps": 300, "batch_size": 64, "lr": 1e-3, "alpha": 0.5, "temperature": 1.0,
                "warmup_steps": 0}
FIT_KEYS = tuple(FALLBACK_FIT)


def fit_defaults() -> dict[str, Any]:
    """``fit_scalers``' defaults for the budget keys it has, the fallback for the others."""
    out = dict(FALLBACK_FIT)
    try:
        from ..fit import fit_scalers
    except ImportError:
        return out
    for name, p in inspect.signature(fit_scalers).parameters.items():
        if name in out and p.default is not inspect.Parameter.empty and p.default is not None:
            out[name] = p.default
    return out


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
    b = {**fit_defaults(), **{k: v for k, v in budget.items() if v is not None}}
    check_dataset(train_dataset)
    subset = seeded_subset(train_dataset, b["max_images"], seed)
    if teacher is not None:
        teacher.eval()
        if teacher.config.num_labels != model.config.num_labels:
            raise ValueError(f"the teacher predicts {teacher.config.num_labels} labels, the model "
                             f"{model.config.num_labels}: distillation needs the same label space (distill=False)")

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = m(pixel_values=batch["pixel_values"]).logits
        if teacher is None:
            return nn.functional.cross_entropy(logits, batch["labels"])
        with torch.no_grad():
            target = teacher(pixel_values=batch["pixel_values"]).logits
        return distillation_loss(logits, target, batch["labels"], temperature=b["temperature"], alpha=b["alpha"])

    for p in model.parameters():
        p.requires_grad_(True)
    settings = LoopSettings(steps=b["steps"], batch_size=b["batch_size"], warmup_steps=b["warmup_steps"],
                            seed=seed, progress=progress, desc="weight selection (matched)")
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    model, _ = run_loop(model, groups, subset, loss_fn, settings, lr=float(b["lr"]))
    model.eval()
    return model


@register_init_method("weight_selection_matched", needs=("teacher", "train_dataset"),
                      description="Weight Selection + WAVE's fitting pass (same images, steps, loss), all weights")
def weight_selection_matched(
    depth: int,
    width: int,
    *,
    num_heads: int | None = None,
    num_labels: int = 10,
    teacher: Any = None,
    initializer: Any = None,
    train_dataset: Any = None,
    seed: int = 0,
    **kw: Any,
) -> ViTForImageClassification:
    """``distill=False`` drops the KD term (CE only): for transfer to a task the teacher does not know, where
    WAVE's fit must be run the same way. Budget keys (``steps``, ``max_images``, ``batch_size``, ``lr``,
    ``alpha``, ``temperature``, ``warmup_steps``) override the shared defaults for both methods alike."""
    id2label = kw.pop("id2label", None)
    distill = kw.pop("distill", True)
    progress = kw.pop("progress", False)
    budget = {k: kw.pop(k) for k in list(kw) if k in FIT_KEYS}
    reject_unknown("weight_selection_matched", kw, FIT_KEYS + ("id2label", "distill", "progress"))
    teacher = load_teacher(teacher)
    model = weight_selection(depth, width, num_heads=num_heads, num_labels=num_labels, teacher=teacher,
                             seed=seed, id2label=id2label)
    return train_all_weights(model, train_dataset, teacher=teacher if distill else None, seed=seed,
                             progress=progress, **budget)
