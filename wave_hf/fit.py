"""Stage 2: fit the scalers of one target size on a little data, with the bank's templates frozen.

The model is ``initializer.parametrize(...)``: a stock ViT whose encoder is ``templates x scalers``. Only
``model.wave_source.scalers`` (the matrix scalers, the vector scalers, with ``train_vectors`` the per-size
vector templates of ``Scalers.vectors``, and with ``lowrank_rank`` the per-layer low-rank correction factors)
and the new classifier head train; the bank's matrix templates are frozen (docs/wave.md section 7, rule 1)
and come out bit-identical. Loss: CE on the labels, plus ``kd_weight`` times the teacher's signal when a
teacher is given: ``KL(p_teacher || p_model) * T^2`` when it has logits for these labels (docs/wave.md section 5
item 7), plus ``feature_weight`` x the standardised MSE of the final CLS feature and ``layer_weight`` x the
layer-wise loss of stage 1 (``wave_hf.distill``). A target narrower or shallower than the teacher is compared
through a linear map to the teacher's width, trained with the scalers and discarded after (TinyBERT's hidden
loss), starting at the unit correspondence of the Kronecker layout (target unit ``a*r+p`` is teacher unit
``a*r_t+p``), and target block ``l`` against teacher block ``round((l+1) L_t / L) - 1``. So a headless
teacher (or one whose head knows other labels) teaches stage 2 too.
AdamW without weight decay (scalers set the scale of the built weights), cosine schedule.

``fit_scalers`` returns the ``Scalers`` only: ``WaveInitializer.build`` always makes a new head, so the head
trained here is discarded there. ``fit_model`` returns the folded, fitted ViT *with* that head, ready for
full fine-tuning.

``head_probe_steps > 0`` makes the fit two-phase: the head alone first, on the frozen start (a random head
trained with the scalers at their large lr pushes noise into a good start), then the scaler fit above.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import ViTForImageClassification

from . import training, vit_layout
from .checkpoint import dataset_fingerprint, tensors_fingerprint
from .distill import check_weight, kl_loss, layerwise_loss, standardized_mse, teacher_fingerprint
from .fold import fold
from .loop import Batches, Cosine, LoopResult, LoopSettings, LossFn, run_loop
from .scalers import (
    DEFAULT_DEPTH_RULE,
    DEPTH_RULES,
    Scalers,
    check_depth_rule,
    check_lowrank_rank,
    check_size,
)
from .teachers import Teacher, check_head, load_teacher
from .templates import TemplateBank
from .validation import JobConfig, check_float, check_int, check_optional_int


class InitializerLike(Protocol):
    """What fitting reads of a ``wave_hf.WaveInitializer``; that class calls ``fit_scalers``, so this module
    names it by what it holds instead of importing it (no import circle)."""

    bank: TemplateBank
    config: Any

    def parametrize(self, depth: int, width: int, num_heads: int | None = None, **kwargs: Any) -> Any: ...


@dataclass
class FitConfig(JobConfig):
    """How stage 2 fits one size: the job's options, validated once, stored with the scalers they made
    (``Scalers.fit_config``) and turned into the ``wave-hf fit`` flags (``transformers.HfArgumentParser``).

    What the run is about (size, data, teacher, seed, checkpoint folder) stays an argument of ``fit_scalers``.
    """

    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "global batch (split over accelerate processes)"})
    max_images: int | None = field(default=1000, metadata={"help": "fit on a seeded subset of this many images"})
    lr: float = field(default=1e-2, metadata={"help": "lr of the scalers and the head"})
    vectors_lr: float | None = field(default=None, metadata={
        "help": "lr of the vector templates and low-rank factors (default lr / 10)"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the teacher's signal (0: CE only)"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    train_vectors: bool = field(default=True, metadata={"help": "also train the per-size vector templates"})
    lowrank_rank: int = field(default=0, metadata={
        "help": "rank of a per-size low-rank correction of every matrix (0: off; folded exactly)"})
    depth_rule: str = field(default=DEFAULT_DEPTH_RULE, metadata={
        "choices": list(DEPTH_RULES),
        "help": "how a start at another depth than the auxiliary model's takes its layers: relative (resample by "
                "relative depth), first (its first layers), even (evenly spaced layers)"})
    head_probe_steps: int = field(default=0, metadata={
        "help": "first train only the new head for this many extra steps, body frozen (0: off)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "linear warm-up, a fraction of the steps"})
    teacher_head: str = field(default="auto", metadata={
        "choices": ["auto", "logits", "none"],
        "help": "auto: use the teacher's logits when its head knows these labels, else its features"})
    feature_weight: float | None = field(default=None, metadata={
        "help": "weight of the final-feature loss (default: 1 for a headless teacher, else 0)"})
    layer_weight: float = field(default=0.0, metadata={"help": "weight of the layer-wise feature loss"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints"})

    def __post_init__(self) -> None:
        self.steps = check_int("steps", self.steps, 1)
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.max_images = check_optional_int("max_images", self.max_images, 1)
        self.lr = check_float("lr", self.lr, 0.0, low_open=True)
        self.vectors_lr = None if self.vectors_lr is None else check_float("vectors_lr", self.vectors_lr, 0.0,
                                                                            low_open=True)
        self.kd_weight = check_float("kd_weight", self.kd_weight, 0.0)
        self.temperature = check_float("temperature", self.temperature, 0.0, low_open=True)
        if not isinstance(self.train_vectors, bool):
            raise TypeError(f"train_vectors must be a bool, got {self.train_vectors!r}")
        self.lowrank_rank = check_int("lowrank_rank", self.lowrank_rank, 0)
        self.depth_rule = check_depth_rule(self.depth_rule)
        self.head_probe_steps = check_int("head_probe_steps", self.head_probe_steps, 0)
        self.warmup_ratio = check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        self.teacher_head = check_head(self.teacher_head)
        self.feature_weight = None if self.feature_weight is None else check_float(
            "feature_weight", self.feature_weight, 0.0)
        self.layer_weight = check_float("layer_weight", self.layer_weight, 0.0)
        self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, 0)


def _fit(
    initializer: InitializerLike,
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
    teacher_head: str = "auto",
    feature_weight: float | None = None,
    layer_weight: float = 0.0,
    image_size: int | None = None,
    depth_rule: str = DEFAULT_DEPTH_RULE,
    head_probe_steps: int = 0,
) -> tuple[ViTForImageClassification, LoopResult]:
    """The shared body of ``fit_scalers`` and ``fit_model``: returns the trained parametrized model and the
    log of the scaler phase (the head probe's losses are not in it)."""
    # Checked by what it holds, not by class: ``initializer`` imports this module (``fit_scalers``).
    if not isinstance(getattr(initializer, "bank", None), TemplateBank) or not hasattr(initializer, "parametrize"):
        raise TypeError(f"initializer must be a WaveInitializer, got {type(initializer).__name__}")
    heads = check_size(initializer.config, depth, width, num_heads)
    check_lowrank_rank(lowrank_rank, width)
    depth_rule = check_depth_rule(depth_rule)
    head_probe_steps = check_int("head_probe_steps", head_probe_steps, 0)
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

    model = initializer.parametrize(depth, width, heads, num_labels=num_labels, id2label=id2label, seed=seed,
                                    lowrank_rank=lowrank_rank, image_size=image_size, depth_rule=depth_rule)
    signal = TeacherSignal.resolve(teacher if kd_weight > 0 else None, model.config, head=teacher_head,
                                   kd_weight=kd_weight, temperature=temperature, feature_weight=feature_weight,
                                   layer_weight=layer_weight)
    model.requires_grad_(False)
    scalers: Scalers = model.wave_source.scalers
    # Scalers multiply frozen templates and the head starts random: both take the large step ``lr``.
    # Vector templates and low-rank factors are added to the weights as they are, where the same step moves
    # a weight ~10x further, so they take ``vectors_lr`` (init_ablation.md: lr 1e-2 / 1e-3 beat 1e-3 for all).
    multiplicative = list(scalers.matrix.values()) + list(scalers.vector_scalers.values())
    multiplicative += list(model.classifier.parameters())
    additive = list(scalers.vectors.values()) if train_vectors else []
    additive += list(scalers.lowrank_a.values()) + list(scalers.lowrank_b.values())  # empty at rank 0
    trained = signal.student(model, lambda: kronecker_projection(initializer.config.template_width, width,
                                                                 signal.teacher.shape.width))
    multiplicative += signal.extra_parameters(trained)
    loss_fn = signal.loss_fn(depth)
    if head_probe_steps:
        probe = replace(settings, steps=head_probe_steps, schedule=Cosine(), output_dir=None, checkpoint_every=0,
                        max_steps=None, desc=f"head probe {depth}x{width}")
        trained = _head_probe(trained, model.classifier, training.dataset_batches(data, probe), loss_fn, probe)
    for p in multiplicative + additive:
        p.requires_grad_(True)
    groups = [{"params": multiplicative, "weight_decay": 0.0},
              {"params": additive, "weight_decay": 0.0, "lr": vectors_lr}]

    run_id = None
    if output_dir is not None:  # hashing the bank and the data costs a little: only when checkpointing
        fitted = initializer.fitted.get((depth, width, heads))
        run_id = {
            "job": "fit", "size": f"{depth}x{width}", "num_heads": heads, "lowrank_rank": lowrank_rank,
            "train_vectors": bool(train_vectors), "vectors_lr": vectors_lr, "kd_weight": kd_weight,
            "temperature": temperature, "max_images": max_images, "num_labels": num_labels,
            "bank": tensors_fingerprint(initializer.bank.state_dict()),
            "start": tensors_fingerprint(fitted.state_dict()) if fitted is not None else "auxiliary scalers",
            "teacher": teacher_fingerprint(signal.teacher) if signal.teacher is not None else None,
            "data": dataset_fingerprint(data, labels),
        }
        run_id.update(signal.fingerprint())
        if image_size is not None:  # absent from runs made before the option existed
            run_id["image_size"] = model.config.image_size
        if depth_rule != "relative":  # likewise: "relative" is the rule of every run made before the option
            run_id["depth_rule"] = depth_rule
        if head_probe_steps:
            run_id["head_probe_steps"] = head_probe_steps
    trained, log = run_loop(trained, groups, training.dataset_batches(data, settings), loss_fn, settings,
                            fingerprint=run_id)
    model = trained.model if isinstance(trained, FeatureStudent) else trained
    model.requires_grad_(False)
    return model, log


def _head_probe(student: nn.Module, head: nn.Module, batches: Batches, loss_fn: LossFn, settings: LoopSettings
                ) -> nn.Module:
    """Phase 1 of a two-phase fit (``head_probe_steps``): train only ``head`` on the frozen start.

    Why: the new head starts random, and trained together with the scalers at the scalers' large ``lr`` its
    early, meaningless gradients flow into the body and damage a good start. A linear probe first gives the
    scaler phase a head that already reads the start's features. It is the fit's own loop, loss, lr (cosine
    to 0, no warm-up) and seeded batch stream (batches ``0 .. steps - 1``; the scaler phase then starts the
    stream again from batch 0). Every other parameter of ``student`` (scalers, feature map) is frozen for the
    phase, so no gradient reaches or accumulates in it: the body comes out bit-identical. The phase writes no
    checkpoint: a resumed fit repeats it (same bits), then restores the scaler phase's checkpoint.
    """
    student.requires_grad_(False)
    head.requires_grad_(True)
    student, _ = run_loop(student, [{"params": list(head.parameters()), "weight_decay": 0.0}], batches, loss_fn,
                          settings)
    return student


@dataclass
class TeacherSignal:
    """What a teacher adds to a stage-2 style loss (the scaler fit, and the budget-matched Weight Selection
    pass that must see the same loss): ``CE + kd_weight * (KL on logits + feature terms)``.

    ``resolve`` loads the teacher at the student's image size and checks its head against the student's
    labels (``Teacher.for_task``); ``student`` wraps the model with the feature map when features are
    matched; ``loss_fn`` is the loop's loss. With no feature weights the loss and the model passed to the loop
    are exactly those of the logits-only fit (same bits, same checkpoints).
    """

    teacher: Teacher | None = None
    kd_weight: float = 0.0
    temperature: float = 1.0
    feature_weight: float = 0.0
    layer_weight: float = 0.0
    teacher_head: str = "auto"

    @classmethod
    def resolve(cls, teacher: Any, student_config: Any, *, head: str = "auto", kd_weight: float = 1.0,
                temperature: float = 1.0, feature_weight: float | None = None, layer_weight: float = 0.0
                ) -> TeacherSignal:
        """``feature_weight`` defaults to 1 for a teacher without logits for these labels, else 0."""
        head = check_head(head)
        layer_weight = check_weight("layer_weight", layer_weight, 0.0)
        if teacher is None:
            return cls(feature_weight=check_weight("feature_weight", feature_weight, 0.0), layer_weight=layer_weight,
                       teacher_head=head)
        c = student_config
        kd = load_teacher(teacher, image_size=c.image_size, head=head)
        kd = kd.for_task(c.num_labels, c.id2label if c.id2label else None, head=head)
        feature_weight = check_weight("feature_weight", feature_weight, 0.0 if kd.has_head else 1.0)
        if not kd.has_head and feature_weight == 0 and layer_weight == 0:
            raise ValueError("this teacher has no logits for these labels (teacher_head, or a head over other labels), "
                             "so it teaches only through feature_weight and layer_weight; both are 0")
        return cls(kd, kd_weight, temperature, feature_weight, layer_weight, head)

    @property
    def features(self) -> bool:
        return self.teacher is not None and bool(self.feature_weight or self.layer_weight)

    def student(self, model: ViTForImageClassification, projection: Callable[[], nn.Linear]) -> nn.Module:
        """``model`` itself, or with the trainable feature map ``projection()`` when features are matched."""
        return FeatureStudent(model, projection(), blocks=self.layer_weight > 0) if self.features else model

    @staticmethod
    def extra_parameters(student: nn.Module) -> list[nn.Parameter]:
        """The feature map's parameters (trained with the rest, at the same rate)."""
        return list(student.project.parameters()) if isinstance(student, FeatureStudent) else []

    def fingerprint(self) -> dict[str, Any]:
        """Checkpoint fields; empty for a logits-only teacher, as before feature matching existed."""
        if not self.features:
            return {}
        return {"feature_weight": self.feature_weight, "layer_weight": self.layer_weight,
                "teacher_head": self.teacher_head}

    def loss_fn(self, depth: int) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
        kd, features = self.teacher, self.features
        pairs = block_pairs(depth, kd.shape.depth) if kd is not None else []

        def loss_fn(student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
            x, y = batch["pixel_values"], batch["labels"]
            if not features:
                logits = student(pixel_values=x).logits
                ce = nn.functional.cross_entropy(logits, y)
                if kd is None:
                    return ce
                with torch.no_grad():
                    target = kd.to(x.device).logits(x)
                return ce + self.kd_weight * kl_loss(logits, target, self.temperature)
            with torch.no_grad():
                target = kd.to(x.device)(x, hidden_states=self.layer_weight > 0)
            logits, feature, blocks = student(x)
            signal = self.feature_weight * standardized_mse(feature, target.feature)
            if self.layer_weight:
                signal = signal + self.layer_weight * layerwise_loss(blocks, target.hidden_states, pairs)
            if kd.has_head:
                signal = signal + kl_loss(logits, target.logits, self.temperature)
            return nn.functional.cross_entropy(logits, y) + self.kd_weight * signal

        return loss_fn


def block_pairs(depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """Target block ``l`` against teacher block ``round((l + 1) * L_t / L) - 1`` (TinyBERT's uniform map):
    the last blocks always meet, and equal depths pair every block with itself."""
    return [(layer, max(0, round((layer + 1) * teacher_depth / depth) - 1)) for layer in range(depth)]


def kronecker_projection(template_width: int, width: int, teacher_width: int) -> nn.Linear:
    """A bias-free ``width -> teacher_width`` map starting at the Kronecker layout's unit correspondence:
    target unit ``a*r + p`` reads teacher unit ``a*r_t + p`` for ``p < min(r, r_t)`` (the identity when the
    widths are equal). Width-from-width is then learned where the correspondence runs out."""
    if teacher_width % template_width:
        raise ValueError(f"the teacher's width {teacher_width} is not a multiple of the bank's template_width="
                         f"{template_width}: its features cannot be matched unit by unit")
    r, r_t = width // template_width, teacher_width // template_width
    out = nn.Linear(width, teacher_width, bias=False)
    with torch.no_grad():
        out.weight.zero_()
        units = torch.arange(template_width)
        for p in range(min(r, r_t)):
            out.weight[units * r_t + p, units * r + p] = 1.0
    return out


class FeatureStudent(nn.Module):
    """The fitted model plus its feature map to the teacher's width: ``x -> (logits, projected CLS feature,
    projected block outputs)`` in one forward, so DDP sees a single call per step."""

    def __init__(self, model: ViTForImageClassification, project: nn.Linear, blocks: bool):
        super().__init__()
        self.model, self.project, self.blocks = model, project, blocks

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        out = vit_layout.encoder(self.model)(pixel_values, output_hidden_states=self.blocks)
        feature = out.last_hidden_state[:, 0]
        blocks = tuple(self.project(h) for h in out.hidden_states[1:]) if self.blocks else ()
        return self.model.classifier(feature), self.project(feature), blocks


def _detached(config, scalers: Scalers) -> Scalers:
    out = Scalers(config, scalers.depth, scalers.width, scalers.num_heads, scalers.lowrank_rank)
    out.load_state_dict({k: v.detach().clone() for k, v in scalers.state_dict().items()})
    return out.requires_grad_(False)


def fit_scalers(
    initializer: InitializerLike,
    depth: int,
    width: int,
    train_dataset: Any,
    config: FitConfig | None = None,
    *,
    num_heads: int | None = None,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    teacher: str | os.PathLike | Teacher | None = None,
    image_size: int | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    **options: Any,
) -> Scalers:
    """Fit new ``Scalers`` for ``(depth, width, num_heads)`` on at most ``max_images`` images (stage 2).

    Args:
        initializer: the ``WaveInitializer`` holding the (frozen) bank; the start is
            ``initializer.scalers_for(...)`` (fitted scalers if it has some for this size, else the
            auxiliary scalers resampled by depth, by ``depth_rule``, and width).
        train_dataset: map-style dataset of ``{"pixel_values", "labels"}`` items; a seeded subset of
            ``max_images`` of them is used (``None``: all).
        num_labels, id2label: the head; default from the dataset's ``ClassLabel`` feature, else
            ``max(label) + 1``.
        teacher: optional teacher (anything ``wave_hf.teachers.load_teacher`` takes), loaded at the model's
            image size. With a trained head over the same labels it gives KL on logits; otherwise (or besides,
            with the weights below) it teaches through its features.
        teacher_head: ``"auto"`` (logits when the head predicts these labels, else features with a warning),
            ``"logits"`` (require them) or ``"none"`` (features only).
        feature_weight, layer_weight: weights of the standardised final-CLS-feature MSE and of the layer-wise
            loss (module docstring) inside the teacher term; ``feature_weight`` defaults to 1 for a teacher
            without logits, else 0; ``layer_weight`` to 0.
        image_size: fit at this input size (a multiple of the patch size; default the bank's): the position
            templates are resampled to it as the teacher family resamples its position embeddings.
        steps, batch_size, lr: AdamW (no weight decay), cosine to 0 after ``warmup_ratio * steps`` warm-up
            steps; ``batch_size`` is the global batch (split across ``accelerate launch`` processes). ``lr``
            drives the scalers and the head: they multiply frozen templates, so a large step is safe.
        vectors_lr: lr of the vector templates and the low-rank factors, which are added to the weights
            directly (default ``lr / 10``). A sweep at 4x64 and 6x128 found lr 1e-2 with 1e-3 here best.
        kd_weight, temperature: the loss is ``CE + kd_weight * (KL * T^2 + feature terms)`` when a teacher is
            given (0: the teacher is not used).
        train_vectors: also train the per-size vector templates (``Scalers.vectors``); they fold exactly.
        lowrank_rank: rank ``k`` (int in ``[0, width]``; 0, the default, is off) of a per-layer correction
            ``A_l @ B_l`` added to each built matrix (q, k, v, o, fc1, fc2), trained with the scalers (at
            ``vectors_lr``). The shared templates cannot give one layer of one size a direction of
            its own; this gives each size a little such freedom (``k * (out + in)`` parameters per matrix)
            and still folds exactly. It starts at zero (LoRA-style, seeded by ``seed``); scalers that already
            carry one (fitted before) keep and train it.
        depth_rule: how a start without fitted scalers takes the auxiliary layers when the depths differ:
            ``"relative"``, ``"first"`` or ``"even"`` (``wave_hf.scalers.depth_indices``; default
            ``scalers.DEFAULT_DEPTH_RULE``).
        head_probe_steps: when > 0, a two-phase fit: first this many steps that train only the new head on
            the frozen start (``_head_probe``: same loop, loss, lr and seeded stream), then the ``steps`` of
            the scaler fit with that head. These steps come on top of ``steps`` (recorded in ``fit_config``).
        output_dir, checkpoint_every, max_steps: resumable checkpoints, as in ``wave_hf.distill.distill``
            (a folder written by another run, e.g. another seed, lr, size, bank or dataset, is refused with
            ``CheckpointMismatchError`` naming the field).

    Raises ``NonFiniteError`` (a ``ValueError``) naming the step when an input batch, the loss or the fitted
    scalers hold NaN/Inf (e.g. NaN pixels, or an lr so large that training diverges); nothing is saved then.

    Returns a detached ``Scalers`` for ``WaveInitializer.build(..., scalers=...)``. The head trained with
    it is discarded (``build`` makes a new one); use ``fit_model`` to keep it.
    """
    cfg = FitConfig.from_options(config, options)
    model, _ = _fit(initializer, depth, width, train_dataset, num_heads=num_heads, num_labels=num_labels,
                    id2label=id2label, teacher=teacher, image_size=image_size, seed=seed, output_dir=output_dir,
                    max_steps=max_steps, progress=progress, **cfg.to_dict())
    scalers = _detached(initializer.config, model.wave_source.scalers)
    scalers.fit_config = cfg.to_dict()
    return scalers


def fit_model(initializer: InitializerLike, depth: int, width: int, train_dataset: Any,
              config: FitConfig | None = None, **kwargs: Any) -> ViTForImageClassification:
    """``fit_scalers`` (same arguments), then ``fold``: a plain ``ViTForImageClassification`` with the fitted
    encoder *and* the fitted head, every weight trainable, ready for ``wave_hf.train.finetune``."""
    run = {k: kwargs.pop(k) for k in _RUN_ARGS if k in kwargs}
    cfg = FitConfig.from_options(config, kwargs)
    model, _ = _fit(initializer, depth, width, train_dataset, **{**_RUN_DEFAULTS, **run}, **cfg.to_dict())
    model = fold(model)
    model.eval()
    return model


#: ``fit_scalers``' run arguments (what the fit is about, not how it fits) and their defaults.
_RUN_DEFAULTS: dict[str, Any] = {"num_heads": None, "num_labels": None, "id2label": None, "teacher": None,
                                 "image_size": None, "seed": 0, "output_dir": None, "max_steps": None,
                                 "progress": True}
_RUN_ARGS = tuple(_RUN_DEFAULTS)
