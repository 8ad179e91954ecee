"""Stage 2: fit the scalers of one target size on a little data, with the bank's templates frozen.

The model is ``initializer.parametrize(...)``: a stock ViT whose encoder is ``templates x scalers``. Only
``model.wave_source.scalers`` (the matrix scalers, the vector scalers, with ``train_vectors`` the per-size
vector templates of ``Scalers.vectors``, and with ``lowrank_rank`` the per-layer low-rank correction factors)
and the new classifier head train; the bank's matrix templates are frozen (docs/wave.md section 7, rule 1)
and come out bit-identical. Loss: CE on the labels, plus ``kd_weight * KL(p_teacher || p_model) * T^2`` when
a teacher is given (docs/wave.md section 5 item 7).
AdamW without weight decay (scalers set the scale of the built weights), cosine schedule.

``fit_scalers`` returns the ``Scalers`` only: ``WaveInitializer.build`` always makes a new head, so the head
trained here is discarded there. ``fit_model`` returns the folded, fitted ViT *with* that head, ready for
full fine-tuning.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import ViTForImageClassification

from . import training
from .checkpoint import dataset_fingerprint, tensors_fingerprint
from .distill import Teacher, distillation_loss, load_teacher, teacher_has_head
from .fold import fold
from .loop import Cosine, LoopResult, LoopSettings, run_loop
from .scalers import Scalers, check_lowrank_rank, check_size
from .templates import TemplateBank

if TYPE_CHECKING:
    from .initializer import WaveInitializer


def _fit(
    initializer: WaveInitializer,
    depth: int,
    width: int,
    train_dataset: Any,
    *,
    num_heads: int | None,
    num_labels: int | None,
    id2label: dict[int, str] | None,
    teacher: str | os.PathLike | Teacher | None,
    max_images: int | None,
    steps: int,
    batch_size: int,
    lr: float,
    vectors_lr: float | None,
    kd_weight: float,
    temperature: float,
    train_vectors: bool,
    lowrank_rank: int,
    warmup_ratio: float,
    seed: int,
    output_dir: str | os.PathLike | None,
    checkpoint_every: int,
    max_steps: int | None,
    progress: bool,
) -> tuple[ViTForImageClassification, LoopResult]:
    """The shared body of ``fit_scalers`` and ``fit_model``: returns the trained parametrized model."""
    # Checked by what it holds, not by class: ``initializer`` imports this module (``fit_scalers``).
    if not isinstance(getattr(initializer, "bank", None), TemplateBank) or not hasattr(initializer, "parametrize"):
        raise TypeError(f"initializer must be a WaveInitializer, got {type(initializer).__name__}")
    heads = check_size(initializer.config, depth, width, num_heads)
    check_lowrank_rank(lowrank_rank, width)
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images must be an int >= 1 or None, got {max_images!r}")
    lr = training.check_positive("lr", lr)
    vectors_lr = lr / 10 if vectors_lr is None else training.check_positive("vectors_lr", vectors_lr)
    kd_weight = training.check_positive("kd_weight", kd_weight, allow_zero=True)
    temperature = training.check_positive("temperature", temperature)
    if not (isinstance(warmup_ratio, (int, float)) and 0.0 <= warmup_ratio < 1.0):
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    settings = LoopSettings(steps=steps, lr=lr, batch_size=batch_size, schedule=Cosine(int(warmup_ratio * steps)),
                            seed=seed, output_dir=output_dir, checkpoint_every=checkpoint_every, max_steps=max_steps,
                            progress=progress, desc=f"fit {depth}x{width}")
    training.check_dataset(train_dataset)
    feature_labels, feature_names = training.dataset_num_labels(train_dataset)
    data = training.seeded_subset(train_dataset, max_images, seed)
    labels = training.dataset_labels(data)
    if num_labels is None and id2label is None:
        num_labels, id2label = feature_labels, feature_names
        if num_labels is None:
            num_labels = max(labels) + 1
    elif id2label is not None:
        num_labels = len(id2label)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an int >= 1, got {num_labels!r}")
    training.check_labels(labels, num_labels)

    kd = None
    if teacher is not None and kd_weight > 0:
        kd = load_teacher(teacher)
        if not teacher_has_head(kd):
            raise ValueError("KD in fit needs a teacher with a classification head (ViTForImageClassification)")
        if kd.config.num_labels != num_labels:
            raise ValueError(f"the teacher predicts {kd.config.num_labels} labels, the model num_labels={num_labels}")
        kd.requires_grad_(False)

    model = initializer.parametrize(depth, width, heads, num_labels=num_labels, id2label=id2label, seed=seed,
                                    lowrank_rank=lowrank_rank)
    model.requires_grad_(False)
    scalers: Scalers = model.wave_source.scalers
    # Scalers multiply frozen templates and the head starts random: both take the large step ``lr``.
    # Vector templates and low-rank factors are added to the weights as they are, where the same step moves
    # a weight ~10x further, so they take ``vectors_lr`` (init_ablation.md: lr 1e-2 / 1e-3 beat 1e-3 for all).
    multiplicative = list(scalers.matrix.values()) + list(scalers.vector_scalers.values())
    multiplicative += list(model.classifier.parameters())
    additive = list(scalers.vectors.values()) if train_vectors else []
    additive += list(scalers.lowrank_a.values()) + list(scalers.lowrank_b.values())  # empty at rank 0
    for p in multiplicative + additive:
        p.requires_grad_(True)
    groups = [{"params": multiplicative, "weight_decay": 0.0},
              {"params": additive, "weight_decay": 0.0, "lr": vectors_lr}]

    def loss_fn(student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x, y = batch["pixel_values"], batch["labels"]
        logits = student(pixel_values=x).logits
        ce = nn.functional.cross_entropy(logits, y)
        if kd is None:
            return ce
        with torch.no_grad():
            target = training.forward_output(kd.to(x.device), x)
        return ce + kd_weight * distillation_loss(logits, target, None, temperature=temperature, alpha=1.0)

    run_id = None
    if output_dir is not None:  # hashing the bank and the data costs a little: only when checkpointing
        fitted = initializer.fitted.get((depth, width, heads))
        run_id = {
            "job": "fit", "size": f"{depth}x{width}", "num_heads": heads, "lowrank_rank": lowrank_rank,
            "train_vectors": bool(train_vectors), "vectors_lr": vectors_lr, "kd_weight": kd_weight,
            "temperature": temperature, "max_images": max_images, "num_labels": num_labels,
            "bank": tensors_fingerprint(initializer.bank.state_dict()),
            "start": tensors_fingerprint(fitted.state_dict()) if fitted is not None else "auxiliary scalers",
            "teacher": tensors_fingerprint(kd.state_dict()) if kd is not None else None,
            "data": dataset_fingerprint(data, labels),
        }
    model, log = run_loop(model, groups, training.dataset_batches(data, settings), loss_fn, settings, fingerprint=run_id)
    model.requires_grad_(False)
    return model, log


def _detached(config, scalers: Scalers) -> Scalers:
    out = Scalers(config, scalers.depth, scalers.width, scalers.num_heads, scalers.lowrank_rank)
    out.load_state_dict({k: v.detach().clone() for k, v in scalers.state_dict().items()})
    return out.requires_grad_(False)


def fit_scalers(
    initializer: WaveInitializer,
    depth: int,
    width: int,
    train_dataset: Any,
    *,
    num_heads: int | None = None,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    teacher: str | os.PathLike | Teacher | None = None,
    max_images: int | None = 1000,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-2,
    vectors_lr: float | None = None,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    train_vectors: bool = True,
    lowrank_rank: int = 0,
    warmup_ratio: float = 0.0,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    max_steps: int | None = None,
    progress: bool = True,
) -> Scalers:
    """Fit new ``Scalers`` for ``(depth, width, num_heads)`` on at most ``max_images`` images (stage 2).

    Args:
        initializer: the ``WaveInitializer`` holding the (frozen) bank; the start is
            ``initializer.scalers_for(...)`` (fitted scalers if it has some for this size, else the
            auxiliary scalers resampled by depth and width).
        train_dataset: map-style dataset of ``{"pixel_values", "labels"}`` items; a seeded subset of
            ``max_images`` of them is used (``None``: all).
        num_labels, id2label: the head; default from the dataset's ``ClassLabel`` feature, else
            ``max(label) + 1``.
        teacher: optional KD teacher (module, folder or repo id) with a head over the same labels.
        steps, batch_size, lr: AdamW (no weight decay), cosine to 0 after ``warmup_ratio * steps`` warm-up
            steps; ``batch_size`` is the global batch (split across ``accelerate launch`` processes). ``lr``
            drives the scalers and the head: they multiply frozen templates, so a large step is safe.
        vectors_lr: lr of the vector templates and the low-rank factors, which are added to the weights
            directly (default ``lr / 10``). A sweep at 4x64 and 6x128 found lr 1e-2 with 1e-3 here best.
        kd_weight, temperature: the loss is ``CE + kd_weight * KL * T^2`` when a teacher is given.
        train_vectors: also train the per-size vector templates (``Scalers.vectors``); they fold exactly.
        lowrank_rank: rank ``k`` (int in ``[0, width]``; 0, the default, is off) of a per-layer correction
            ``A_l @ B_l`` added to each built matrix (q, k, v, o, fc1, fc2), trained with the scalers (at
            ``vectors_lr``). The shared templates cannot give one layer of one size a direction of
            its own; this gives each size a little such freedom (``k * (out + in)`` parameters per matrix)
            and still folds exactly. It starts at zero (LoRA-style, seeded by ``seed``); scalers that already
            carry one (fitted before) keep and train it.
        output_dir, checkpoint_every, max_steps: resumable checkpoints, as in ``wave_hf.distill.distill``
            (a folder written by another run, e.g. another seed, lr, size, bank or dataset, is refused with
            ``CheckpointMismatchError`` naming the field).

    Raises ``NonFiniteError`` (a ``ValueError``) naming the step when an input batch, the loss or the fitted
    scalers hold NaN/Inf (e.g. NaN pixels, or an lr so large that training diverges); nothing is saved then.

    Returns a detached ``Scalers`` for ``WaveInitializer.build(..., scalers=...)``. The head trained with
    it is discarded (``build`` makes a new one); use ``fit_model`` to keep it.
    """
    model, _ = _fit(initializer, depth, width, train_dataset, num_heads=num_heads, num_labels=num_labels,
                    id2label=id2label, teacher=teacher, max_images=max_images, steps=steps, batch_size=batch_size,
                    lr=lr, vectors_lr=vectors_lr, kd_weight=kd_weight, temperature=temperature, train_vectors=train_vectors,
                    lowrank_rank=lowrank_rank, warmup_ratio=warmup_ratio, seed=seed, output_dir=output_dir,
                    checkpoint_every=checkpoint_every, max_steps=max_steps, progress=progress)
    return _detached(initializer.config, model.wave_source.scalers)


def fit_model(initializer: WaveInitializer, depth: int, width: int, train_dataset: Any,
              **kwargs: Any) -> ViTForImageClassification:
    """``fit_scalers`` (same keywords), then ``fold``: a plain ``ViTForImageClassification`` with the fitted encoder *and*
    the fitted head, every weight trainable, ready for ``wave_hf.train.finetune``."""
    options = {**_fit_defaults(), **kwargs}  # fit_scalers' keywords and defaults, one source of truth
    model, _ = _fit(initializer, depth, width, train_dataset, **options)
    model = fold(model)
    model.eval()
    return model


def _fit_defaults() -> dict[str, Any]:
    params = inspect.signature(fit_scalers).parameters
    return {name: p.default for name, p in params.items() if p.kind is p.KEYWORD_ONLY}
