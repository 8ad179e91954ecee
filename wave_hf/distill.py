"""Stage 1: distil a teacher ViT into a ``TemplateBank`` through a Kronecker-constrained auxiliary model.

The auxiliary model has the teacher's depth and width, but every encoder tensor is rebuilt at each step
from the shared templates and the auxiliary scalers (docs/wave.md section 1(a)), so the gradients train
both. The teacher is any ``wave_hf.teachers.load_teacher`` input (ViT, DeiT, Dinov2; a folder, a repo id or
a model), at its own image size or at ``image_size`` (position embeddings resampled once, as the family
does). Two starts:

* ``init="teacher"`` (default; issue 8, lever 1): every teacher matrix type, stacked over layers, is
  replaced by its nearest Kronecker sum (Van Loan rank-N SVD, ``nearest_kronecker``; q/k/v are fused as rows
  ``[q; k; v]``), and every vector tensor by ``nearest_kronecker_vector`` (exact when
  ``num_vector_templates >= r``). The auxiliary model then starts close to the teacher, and distillation
  only has to recover what the rank-N constraint loses.
* ``init="scratch"``: ``TemplateBank(config)``, random (docs/wave.md section 8.1 rules).

Loss: ``alpha * KD + (1 - alpha) * CE(z_aux, y)``, where the teacher's signal ``KD`` is a weighted sum of

* ``KL(softmax(z_t/T) || softmax(z_aux/T)) * T^2`` (batch mean) when the teacher has logits for the data
  (docs/wave.md section 5 item 8);
* ``feature_weight`` x the standardised MSE of the final CLS feature;
* ``layer_weight`` x the layer-wise loss: every block's output, all tokens, each block's targets
  standardised per channel by the batch's statistics (``layerwise_loss``). A real teacher needs it:
  final-feature supervision alone let the inner blocks drift and kept CLS R^2 near 0 (docs/wave.md section 9).
* ``forced_weight`` x the same loss with teacher forcing: every auxiliary block reads the teacher's input to
  it instead of its own chain's (``StudentOutputs``), and the embeddings are matched too.

Defaults keep the original behaviour for a teacher with logits (``alpha=0.5``, KL only); a teacher without
(``teacher_head="none"``, a headless model, or a head over other labels under ``"auto"``) distils from its
features only: ``alpha=1``, ``feature_weight=1``, ``layer_weight=1``. Weight decay applies to the matrix
templates only: the product ``T kron S`` is bilinear, so decaying the templates fixes the scale split
without shrinking the scalers.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging

from . import vit_layout
from .checkpoint import dataset_fingerprint, tensors_fingerprint
from .configuration_wave import WaveTemplateConfig
from .fold import parametrize_vit
from .kronecker import kron_matrix, nearest_kronecker, nearest_kronecker_vector
from .loop import Cosine, LoopSettings, run_loop
from .scalers import MATRIX_TYPES, vector_kinds
from .teachers import Teacher, check_head, load_teacher
from .templates import TemplateBank
from .training import (
    accuracy,
    check_dataset,
    check_labels,
    check_positive,
    dataset_batches,
    dataset_labels,
    dataset_num_labels,
)
from .validation import JobConfig, check_float, check_int

logger = logging.get_logger(__name__)

INITS = ("teacher", "scratch")
METRICS_FILE = "distill_metrics.json"
#: Images of ``eval_dataset`` on which the auxiliary model's features are compared with the teacher's (R^2).
R2_IMAGES = 512


# -------------------------------------------------------------------------------------------- teacher
def config_from_teacher(teacher: Any, *, image_size: int | None = None, **overrides: Any) -> WaveTemplateConfig:
    """A bank config whose geometry is the teacher's: auxiliary depth and width, image (``image_size``, default
    the teacher's), patch, channels, LayerNorm eps, qkv bias, activation, head dim, MLP ratio and
    preprocessing. ``overrides`` set the other fields (defaults: ``template_width=64``, ``num_templates=6`` and
    ``num_vector_templates`` = r = width / template width).

    Why J = r: a vector tensor (LayerNorm, bias, embedding) is held as a rank-J Kronecker sum, exact only from
    J = r on. A real teacher's vectors are not low-rank: DINOv2 ViT-S/14's final LayerNorm alone, cut to J = 3
    of r = 6 in the exact teacher, caps its CLS R^2 at 0.11 (``benchmarks/results/stage1_steps.md``),
    while J = r costs about 1% of the teacher's parameters."""
    teacher = load_teacher(teacher, image_size=image_size)
    s, c = teacher.shape, teacher.config
    values: dict[str, Any] = dict(
        template_width=64, num_templates=6,
        head_dim=s.head_dim, mlp_ratio=s.mlp_ratio, image_size=s.image_size, patch_size=s.patch_size,
        num_channels=s.num_channels, layer_norm_eps=float(c.layer_norm_eps), qkv_bias=bool(c.qkv_bias),
        hidden_act=c.hidden_act, aux_depth=s.depth, aux_width=s.width,
        teacher_name_or_path=teacher.name_or_path, teacher_image_size=teacher.native_image_size,
        **teacher.preprocessing.for_channels(s.num_channels).config_fields(),
    )
    values.update(overrides)
    if s.width % values["template_width"]:
        raise ValueError(f"template_width={values['template_width']} must divide the teacher's width {s.width}; "
                         "pass template_width= a divisor of it")
    values.setdefault("num_vector_templates", s.width // values["template_width"])
    config = WaveTemplateConfig(**values)
    check_teacher(config, teacher, init="teacher")
    return config


def check_teacher(config: WaveTemplateConfig, teacher: Any, init: str = "teacher") -> None:
    """Raise, naming the field, when the teacher's geometry cannot be distilled into ``config``."""
    teacher = load_teacher(teacher)
    s, c = teacher.shape, teacher.config
    if config.image_size != s.image_size:
        raise ValueError(f"teacher/config mismatch: config.image_size={config.image_size!r} but the teacher works "
                         f"at {s.image_size!r}; pass image_size={config.image_size} to distill (or load_teacher) to "
                         "resample the teacher's position embeddings")
    expected: dict[str, tuple[Any, Any]] = {
        "patch_size": (config.patch_size, s.patch_size),
        "num_channels": (config.num_channels, s.num_channels),
    }
    if init == "teacher":  # the auxiliary model *is* the teacher's architecture
        expected.update({
            "aux_depth": (config.aux_depth, s.depth),
            "aux_width": (config.aux_width, s.width),
            "head_dim": (config.head_dim, s.head_dim),
            "mlp_ratio": (config.mlp_ratio, s.mlp_ratio),
            "qkv_bias": (config.qkv_bias, bool(c.qkv_bias)),
            "hidden_act": (config.hidden_act, c.hidden_act),
            "layer_norm_eps": (config.layer_norm_eps, float(c.layer_norm_eps)),
        })
    for field_name, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ValueError(f"teacher/config mismatch: config.{field_name}={ours!r} but the teacher has {theirs!r}")


# ------------------------------------------------------------------------------------ teacher init
@torch.no_grad()
def init_from_teacher(config: WaveTemplateConfig, teacher: Any, *, match_norms: bool = True) -> TemplateBank:
    """A bank whose auxiliary model is the nearest Kronecker-sum approximation of the teacher.

    Matrices: one rank-``num_templates`` Van Loan decomposition per type over the layer stack (templates
    shared across layers, scalers per layer). Vectors: ``nearest_kronecker_vector`` per tensor (exact when
    ``num_vector_templates >= r``). Deterministic: no random number is drawn.

    ``match_norms`` rescales each layer's scalers so that every approximated matrix keeps the teacher's
    Frobenius norm: truncation drops energy (for a teacher trained from a random init, mostly the
    incompressible init noise), which shrinks attention logits and MLP pre-activations layer after layer.

    The teacher's stock ViT state is decomposed (``Teacher.encoder_state``: Dinov2's layer scale folded in;
    a DeiT distillation token dropped, so that one family's start is only near its teacher).
    """
    teacher = load_teacher(teacher)
    check_teacher(config, teacher, "teacher")
    state = teacher.encoder_state()
    depth, r, j = config.aux_depth, config.aux_ratio, config.num_vector_templates
    bank = TemplateBank(config)

    def layer_stack(name: str) -> Tensor:
        return torch.stack([state[vit_layout.layer_key(i, name)] for i in range(depth)])

    stacks = {
        "qkv": torch.cat([layer_stack("q"), layer_stack("k"), layer_stack("v")], dim=1),
        "o": layer_stack("o"), "fc1": layer_stack("fc1"), "fc2": layer_stack("fc2"),
    }
    for kind in MATRIX_TYPES:
        templates, scalers = nearest_kronecker(stacks[kind], config.num_templates, r)
        if match_norms:
            approx = kron_matrix(templates, scalers)
            gain = stacks[kind].flatten(1).norm(dim=1) / approx.flatten(1).norm(dim=1).clamp_min(1e-12)
            scalers = scalers * gain[:, None, None, None]
        bank.templates[kind].copy_(templates)
        bank.aux.matrix[kind].copy_(scalers)
    width = config.aux_width
    for name, kind in vector_kinds(config).items():
        if kind.per_layer:
            tensor = layer_stack(name).unsqueeze(1)  # (L, 1, units)
        else:
            tensor = state[vit_layout.global_key(name)]
            # patch weight -> (C*p*p, width) (the rule transposes it back); cls (1, width), pos (tokens, width),
            # LayerNorm/bias (1, width)
            tensor = tensor.reshape(width, -1).T if name == "patch_weight" else tensor.reshape(-1, width)
        templates, scalers = nearest_kronecker_vector(tensor, j, r)
        bank.aux.vectors[name].copy_(templates)
        bank.aux.vector_scalers[name].copy_(scalers)
    return bank


# ----------------------------------------------------------------------------------------- aux model
def aux_vit_config(config: WaveTemplateConfig, num_labels: int, id2label: dict[int, str] | None = None) -> ViTConfig:
    """The stock ``ViTConfig`` of the auxiliary model (teacher-sized)."""
    c = config
    shape = vit_layout.ViTShape(c.aux_depth, c.aux_width, c.aux_width // c.head_dim, c.mlp_ratio, c.image_size,
                                c.patch_size, c.num_channels)
    return vit_layout.make_vit_config(shape, layer_norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias,
                                      hidden_act=c.hidden_act, num_labels=num_labels, id2label=id2label)


def aux_model(bank: TemplateBank, num_labels: int, *, teacher: Any = None,
              id2label: dict[int, str] | None = None, train_templates: bool = False,
              seed: int = 0) -> ViTForImageClassification:
    """The auxiliary model: a ViT whose encoder reads ``bank``'s templates and auxiliary scalers.

    The classifier is the teacher's (copied) when it is a linear map of the CLS feature, else new (seeded;
    e.g. Dinov2's head reads CLS and the mean patch). The model holds its own copy of the templates; its
    scalers are a copy of ``bank.aux`` too, so ``bank`` is never modified.
    """
    from .scalers import Scalers

    config = bank.config
    scalers = Scalers(config, config.aux_depth, config.aux_width)
    scalers.load_state_dict(bank.aux.state_dict())
    model = parametrize_vit(config, bank.templates, scalers, aux_vit_config(config, num_labels, id2label),
                            seed=seed, train_templates=train_templates)
    head = load_teacher(teacher).cls_classifier if teacher is not None else None
    if head is not None:
        if head.out_features != num_labels:
            raise ValueError(f"the teacher's classifier has {head.out_features} labels, num_labels={num_labels}")
        with torch.no_grad():
            model.classifier.weight.copy_(head.weight)
            model.classifier.bias.copy_(head.bias)
    return model


def kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(z_t/T) || softmax(z_s/T)) * T^2``, batch mean."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student_logits / t, dim=-1),
                                nn.functional.log_softmax(teacher_logits / t, dim=-1),
                                reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(student: Tensor, teacher: Tensor, labels: Tensor | None, *, student_logits: Tensor | None = None,
                      temperature: float = 1.0, alpha: float = 0.5, feature: bool = False) -> Tensor:
    """``alpha * KD + (1 - alpha) * CE``; KD is ``KL(p_t || p_s) * T^2`` (batch mean) on logits, or MSE on
    CLS features when ``feature`` (``student_logits`` then feeds the CE term)."""
    logits = student if student_logits is None else student_logits
    kd = nn.functional.mse_loss(student, teacher) if feature else kl_loss(student, teacher, temperature)
    if alpha >= 1.0 or labels is None:
        return kd
    ce = nn.functional.cross_entropy(logits, labels)
    return alpha * kd + (1.0 - alpha) * ce


def standardized_mse(student: Tensor, target: Tensor) -> Tensor:
    """MSE with each channel of ``target`` divided by its standard deviation over the batch (and tokens).

    Why: a real teacher's residual stream has channels orders of magnitude apart (DINOv2's "massive
    activations"); plain MSE would fit only those. Per channel, the loss is ``(1 - R^2_c)`` for a student that
    matches the mean, so 1 means "predicts the mean" and 0 "exact". Variances are floored at 1e-3 of their
    mean, so a (near-)constant channel cannot dominate.
    """
    flat = target.detach().reshape(-1, target.shape[-1]).float()
    var = flat.var(dim=0, unbiased=False)
    var = var.clamp_min(1e-3 * var.mean().clamp_min(1e-12))
    return ((student - target).pow(2) / var).mean()


def layerwise_loss(student_blocks: tuple[Tensor, ...] | list[Tensor], teacher_blocks: tuple[Tensor, ...] | list[Tensor],
                   pairs: list[tuple[int, int]] | None = None, project: nn.Module | None = None) -> Tensor:
    """Mean ``standardized_mse`` over blocks (all tokens): student block ``i`` against teacher block ``j`` for
    ``(i, j)`` in ``pairs`` (default: block ``l`` against block ``l``); ``project`` maps student features to the
    teacher's width when they differ (stage 2)."""
    pairs = pairs if pairs is not None else [(i, i) for i in range(len(teacher_blocks))]
    losses = []
    for i, j in pairs:
        s = student_blocks[i] if project is None else project(student_blocks[i])
        losses.append(standardized_mse(s, teacher_blocks[j]))
    return torch.stack(losses).mean()


def r2_score(prediction: Tensor, target: Tensor) -> float:
    """Variance-weighted ``R^2`` of ``prediction`` against ``target`` ``(N, D)``: ``1 - SSE / SST``."""
    sse = (prediction.double() - target.double()).pow(2).sum()
    sst = (target.double() - target.double().mean(dim=0)).pow(2).sum()
    return float(1.0 - sse / sst.clamp_min(1e-30))


@torch.no_grad()
def feature_r2(model: nn.Module, teacher: Any, dataset: Any, *, max_images: int = R2_IMAGES,
               batch_size: int = 64) -> dict[str, float]:
    """R^2 of a ViT's final CLS feature and mean patch feature (after the final LayerNorm) against the
    teacher's, on the first ``max_images`` images of ``dataset``: how much of the teacher a model keeps."""
    from .data import collate_images

    teacher = load_teacher(teacher)
    model.eval()
    device = next(model.parameters()).device
    teacher.to(device)
    encoder = vit_layout.encoder(model)
    ours, theirs = [], []
    n = min(max_images, len(dataset))
    for start in range(0, n, batch_size):
        x = collate_images([dataset[i] for i in range(start, min(n, start + batch_size))])["pixel_values"].to(device)
        s, t = encoder(x).last_hidden_state, teacher(x).last_hidden_state
        ours.append(torch.stack([s[:, 0], s[:, 1:].mean(1)]).cpu())
        theirs.append(torch.stack([t[:, 0], t[:, 1:].mean(1)]).cpu())
    s, t = torch.cat(ours, dim=1), torch.cat(theirs, dim=1)
    return {"cls_r2": round(r2_score(s[0], t[0]), 5), "patch_mean_r2": round(r2_score(s[1], t[1]), 5)}


@torch.no_grad()
# ------------------------------------------------------------------------------------------- distill
def task_labels(teacher: Teacher, dataset: Any) -> tuple[int | None, dict[int, str] | None]:
    """``(num_labels, id2label)`` of the data, for ``Teacher.for_task``: the ``ClassLabel`` feature when there
    is one; else ``None`` when every label fits the teacher's head (a subset may miss the last classes),
    else ``max(label) + 1``."""
    n, id2label = dataset_num_labels(dataset)
    if n is not None:
        return n, id2label
    top = max(dataset_labels(dataset))
    return (None if teacher.has_head and top < teacher.num_labels else top + 1), None


def check_weight(name: str, value: float | None, default: float) -> float:
    """A loss weight: ``None`` takes ``default``; else a finite number >= 0."""
    return default if value is None else check_positive(name, value, allow_zero=True)


@dataclass
class DistillConfig(JobConfig):
    """How stage 1 distils: the job's options, validated once, recorded in the bank's metrics
    (``distill_<field>``) and turned into the ``wave-hf distill`` flags (``transformers.HfArgumentParser``).

    What the run is about (teacher, data, bank geometry, image size, seed, checkpoint folder) stays an argument
    of ``distill``.
    """

    init: str = field(default="teacher", metadata={
        "choices": list(INITS), "help": "teacher: nearest-Kronecker start from the teacher; scratch: random"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "global batch (split over accelerate processes)"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "on the matrix templates only"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "linear warm-up share of the steps"})
    temperature: float = field(default=1.0, metadata={"help": "KD temperature"})
    alpha: float | None = field(default=None, metadata={
        "help": "weight of the teacher's signal vs the labels' CE, in [0, 1] (default 0.5 with teacher logits, "
                "1 without)"})
    feature_weight: float | None = field(default=None, metadata={
        "help": "weight of the final CLS feature loss (default 1 without teacher logits, else 0)"})
    layer_weight: float | None = field(default=None, metadata={
        "help": "weight of the layer-wise loss, every block's output (default 1 without teacher logits, else 0)"})
    forced_weight: float = field(default=0.0, metadata={
        "help": "weight of the teacher-forced layer-wise loss: every auxiliary block reads the teacher's input to "
                "that block instead of its own previous block's output, and the embeddings are matched too; added "
                "to the other terms (feature_weight=0 and layer_weight=0 leave teacher forcing alone)"})
    teacher_head: str = field(default="auto", metadata={
        "choices": ["auto", "logits", "none"],
        "help": "auto: distil the teacher's logits when its checkpoint has a trained classifier over the data's "
                "labels, else (with a warning) its features only; logits: require that head; none: ignore it"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints (0: only the end)"})

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        self.steps = check_int("steps", self.steps, 1)
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.lr = check_float("lr", self.lr, 0.0, low_open=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, 0.0)
        self.warmup_ratio = check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        self.temperature = check_float("temperature", self.temperature, 0.0, low_open=True)
        self.alpha = None if self.alpha is None else check_float("alpha", self.alpha, 0.0, 1.0)
        for name in ("feature_weight", "layer_weight"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else check_float(name, value, 0.0))
        self.forced_weight = check_float("forced_weight", self.forced_weight, 0.0)
        self.teacher_head = check_head(self.teacher_head)
        self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, 0)


def distill(
    teacher: Any,
    train_dataset: Any,
    distill_config: DistillConfig | None = None,
    *,
    config: WaveTemplateConfig | None = None,
    image_size: int | None = None,
    eval_dataset: Any | None = None,
    dataset_name: str | None = None,
    output_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> TemplateBank:
    """Distil ``teacher`` into a ``TemplateBank`` (stage 1) and return it.

    Args:
        teacher: a ViT/DeiT/Dinov2 model, a ``Teacher``, a local folder or a Hub repo id (``load_teacher``).
        train_dataset: map-style dataset of ``{"pixel_values": (C,H,W), "labels": int}`` items, preprocessed
            as the teacher expects (``load_image_dataset(..., preprocessing=teacher.preprocessing)``).
        config: the bank's config; default ``config_from_teacher(teacher)`` (template width 64, 6 matrix
            templates per type, r vector templates per vector tensor). Its geometry must match the teacher's
            (checked, per field).
        init: ``"teacher"`` (nearest-Kronecker decomposition of the teacher) or ``"scratch"`` (random).
        steps, batch_size: optimisation steps and *global* batch size (split across processes).
        lr: AdamW peak learning rate (default 5e-4, the sibling code's rate). Measured on the 12 x 192 ancestry:
            a rank-6..16 teacher start is still near chance at step 0 (12 layers compound the truncation), so
            the start needs a full-size rate to recover, not a gentle one.
        weight_decay: on the matrix templates only (none on scalers, vector templates or the head).
        warmup_ratio: linear warm-up share of ``steps``, then cosine decay to 0.
        temperature: KD temperature.
        alpha: weight of the teacher's signal; the loss is ``alpha*KD + (1-alpha)*CE``. Default 0.5 with
            logits, 1.0 (no labels) without: a teacher that has no head for these labels teaches by features.
        feature_weight, layer_weight: weights of the standardised final-CLS-feature MSE and of the layer-wise
            loss inside ``KD`` (module docstring). Default 0 with logits (the original loss), 1 without.
        teacher_head: ``"auto"`` (the head when it is trained and predicts the data's labels, else features
            with a warning), ``"logits"`` (require it) or ``"none"`` (ignore it).
        image_size: distil at this input size (a multiple of the patch size; default the teacher's): the
            teacher's position embeddings are resampled once, and the bank records the size.
        eval_dataset: if given, teacher and auxiliary accuracy (with logits) and the auxiliary model's
            feature R^2 against the teacher (CLS and mean patch, at step 0 and at the end) go to ``config.metrics``.
        dataset_name: provenance for the card (``config.teacher_dataset``).
        output_dir: checkpoints (``output_dir/checkpoints/step_*``, safetensors + JSON, written atomically);
            a rerun resumes from the newest complete one and ends bit-identical to an uninterrupted run. A
            folder written by another run (seed, lr, steps, teacher, data, ...) is refused with
            ``CheckpointMismatchError`` naming the field; pickled (accelerate) checkpoints are never loaded.
        checkpoint_every: steps between checkpoints (0: only at the end).
        max_steps: stop at this global step (with a checkpoint); the returned bank is the partial one.
        seed: data order, the random start and the new head when the teacher has none.

    Raises ``NonFiniteError`` (a ``ValueError``) naming the step when an input batch, the loss or the trained
    bank holds NaN/Inf; nothing is saved then.
    """
    cfg = DistillConfig.from_options(distill_config, options)
    init, steps, batch_size, lr = cfg.init, cfg.steps, cfg.batch_size, cfg.lr
    weight_decay, warmup_ratio, temperature, alpha = cfg.weight_decay, cfg.warmup_ratio, cfg.temperature, cfg.alpha
    feature_weight, layer_weight, teacher_head = cfg.feature_weight, cfg.layer_weight, cfg.teacher_head
    forced_weight = cfg.forced_weight
    checkpoint_every = cfg.checkpoint_every
    settings = LoopSettings(steps=steps, lr=lr, batch_size=batch_size, schedule=Cosine(int(warmup_ratio * steps)),
                            seed=seed, output_dir=output_dir, checkpoint_every=checkpoint_every, max_steps=max_steps,
                            progress=progress, desc="distill")
    check_dataset(train_dataset)
    if eval_dataset is not None:
        check_dataset(eval_dataset, "eval_dataset")
    teacher = load_teacher(teacher, image_size=image_size, head=teacher_head)
    if config is None:
        config = config_from_teacher(teacher)
    elif not isinstance(config, WaveTemplateConfig):
        raise TypeError(f"config must be a WaveTemplateConfig, got {type(config).__name__}")
    else:  # the bank records its metrics and provenance in its config: never in the caller's
        config = copy.deepcopy(config)
    check_teacher(config, teacher, init)
    teacher = teacher.for_task(*task_labels(teacher, train_dataset), head=teacher_head)
    headed = teacher.has_head
    alpha = (0.5 if headed else 1.0) if alpha is None else float(alpha)
    feature_weight = check_weight("feature_weight", feature_weight, 0.0 if headed else 1.0)
    layer_weight = check_weight("layer_weight", layer_weight, 0.0 if headed else 1.0)
    if not headed and alpha > 0 and feature_weight == 0 and layer_weight == 0 and forced_weight == 0:
        raise ValueError("this teacher has no logits for the data (teacher_head, or a head over other labels), so "
                         "it teaches only through feature_weight, layer_weight and forced_weight; all are 0")
    blockwise = layer_weight > 0 or forced_weight > 0
    if blockwise and (config.aux_depth, config.aux_width) != (teacher.shape.depth, teacher.shape.width):
        raise ValueError(f"layer_weight={layer_weight}, forced_weight={forced_weight} match block outputs, so the "
                         "auxiliary model must have the "
                         f"teacher's depth and width ({teacher.shape.depth}x{teacher.shape.width}), got "
                         f"aux_depth={config.aux_depth}, aux_width={config.aux_width}")
    labels = dataset_labels(train_dataset)
    if headed:
        num_labels = teacher.num_labels
        id2label = {int(k): str(v) for k, v in teacher.config.id2label.items()} if teacher.config.id2label else None
    else:
        num_labels, id2label = dataset_num_labels(train_dataset)
        num_labels = num_labels if num_labels is not None else max(labels) + 1
    check_labels(labels, num_labels)

    if init == "teacher":
        bank = init_from_teacher(config, teacher)
    else:
        bank = TemplateBank(config)
        bank.reset_random(torch.Generator().manual_seed(seed))
    model = aux_model(bank, num_labels, teacher=teacher, id2label=id2label, train_templates=True, seed=seed)

    metrics = _start_metrics(output_dir, model, teacher, eval_dataset, headed)

    source = model.wave_source
    decay = list(source.templates.values())
    no_decay = list(source.scalers.parameters()) + list(model.classifier.parameters())
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def loss_fn(student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x, y = batch["pixel_values"], batch["labels"]
        with torch.no_grad():
            target = teacher.to(x.device)(x, hidden_states=blockwise)
        states = (target.embeddings, *target.hidden_states) if forced_weight else None
        feature, logits, blocks, forced = student(x, states)
        terms = []
        if headed:
            terms.append(kl_loss(logits, target.logits, temperature))
        if feature_weight:
            terms.append(feature_weight * standardized_mse(feature, target.feature))
        if layer_weight:
            terms.append(layer_weight * layerwise_loss(blocks, target.hidden_states))
        if forced_weight:
            terms.append(forced_weight * layerwise_loss(forced, states))
        kd = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        if alpha >= 1.0:
            return kd
        return alpha * kd + (1.0 - alpha) * nn.functional.cross_entropy(logits, y)

    run_id = None
    if output_dir is not None:  # hashing the teacher and the data costs a little: only when checkpointing
        run_id = {
            "job": "distill", "init": init, "size": f"{config.aux_depth}x{config.aux_width}",
            "templates": f"{config.num_templates}x{config.template_width}",
            "vector_templates": config.num_vector_templates, "num_labels": num_labels,
            "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "temperature": temperature, "alpha": alpha,
            "teacher": teacher_fingerprint(teacher),
            "data": dataset_fingerprint(train_dataset, labels),
        }
        if feature_weight or layer_weight or not headed:  # absent from runs made before they existed
            run_id.update(feature_weight=feature_weight, layer_weight=layer_weight, teacher_head=teacher_head,
                          image_size=config.image_size)
        if forced_weight:  # absent from runs made before it existed
            run_id["forced_weight"] = forced_weight
    chain = headed or feature_weight > 0 or layer_weight > 0 or alpha < 1.0
    wrapper, log = run_loop(StudentOutputs(model, blocks=layer_weight > 0, chain=chain), groups,
                            dataset_batches(train_dataset, settings), loss_fn, settings, fingerprint=run_id)
    model = wrapper.model

    with torch.no_grad():
        for kind in MATRIX_TYPES:
            bank.templates[kind].copy_(model.wave_source.templates[kind])
        bank.aux.load_state_dict(model.wave_source.scalers.state_dict())
    bank.requires_grad_(False)

    head = min(10, len(log.losses))
    metrics.update({
        "distill_init": init, "distill_steps": log.steps_done, "distill_batch_size": batch_size,
        "distill_lr": lr, "distill_alpha": alpha, "distill_temperature": temperature,
        "distill_loss_start": round(sum(log.losses[:head]) / max(head, 1), 5),
        "distill_loss_end": round(sum(log.losses[-head:]) / max(head, 1), 5),
    })
    if feature_weight or layer_weight:
        metrics.update({"distill_feature_weight": feature_weight, "distill_layer_weight": layer_weight})
    if eval_dataset is not None and headed:
        metrics["aux_accuracy"] = round(accuracy(model, eval_dataset), 5)
        if metrics.get("teacher_accuracy"):
            metrics["aux_over_teacher"] = round(metrics["aux_accuracy"] / metrics["teacher_accuracy"], 5)
        logger.info(f"auxiliary model after {log.steps_done} steps: {metrics['aux_accuracy']:.4f} "
                    f"(teacher {metrics['teacher_accuracy']:.4f})")
    if eval_dataset is not None and not headed:
        metrics.update({f"aux_{k}": v for k, v in feature_r2(model, teacher, eval_dataset).items()})
    c = bank.config
    c.teacher_name_or_path = teacher.name_or_path or config.teacher_name_or_path
    c.teacher_image_size = c.teacher_image_size or teacher.native_image_size
    if c.image_mean is None:  # a config made by hand: record the teacher's preprocessing
        prep = teacher.preprocessing.for_channels(c.num_channels).config_fields()
        c.image_mean, c.image_std, c.resample = prep["image_mean"], prep["image_std"], prep["resample"]
    if dataset_name is not None:
        c.teacher_dataset = dataset_name
    recorded = {f"distill_{k}": v for k, v in cfg.to_dict().items() if v is not None}  # how it was distilled
    c.metrics = {**(config.metrics or {}), **recorded, **metrics}  # measured values (steps done) win
    return bank


def teacher_fingerprint(teacher: Teacher) -> str:
    """A hash of the teacher's stock encoder and its head: for a ``ViTForImageClassification`` the same as
    hashing its ``state_dict``, so checkpoints written before teacher adapters existed still resume."""
    head = {} if teacher.classifier is None else {f"classifier.{k}": v for k, v in teacher.classifier.state_dict().items()}
    return tensors_fingerprint({**teacher.encoder_state(), **head})


class StudentOutputs(nn.Module):
    """``(x, teacher states) -> (final CLS feature, logits, block outputs, teacher-forced outputs)`` in one
    forward, so DDP sees a single call per step.

    The chain (the student's own forward) gives the feature, the logits and, with ``blocks``, every block's output
    before the final LayerNorm. With ``teacher_states`` (the teacher's embeddings, then its block outputs) the
    student is also teacher-forced: block ``l`` reads the teacher's output of block ``l - 1``, and the forced
    outputs are the student's embeddings followed by every block's. Teacher forcing costs what a plain forward
    does, and no block waits for the blocks before it to become right. Without the ``chain``, the feature and
    logits are read from the last forced block.
    """

    def __init__(self, model: ViTForImageClassification, blocks: bool = False, chain: bool = True):
        super().__init__()
        self.model, self.blocks, self.chain = model, blocks, chain

    def forward(self, pixel_values: Tensor, teacher_states: tuple[Tensor, ...] | None = None,
                ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        vit = vit_layout.encoder(self.model)
        forced: tuple[Tensor, ...] = ()
        if teacher_states is not None:
            outputs = [vit.embeddings(pixel_values)]
            outputs += [layer(h) for layer, h in zip(vit_layout.encoder_layers(vit), teacher_states[:-1], strict=True)]
            forced = tuple(outputs)
        if self.chain or teacher_states is None:
            out = vit(pixel_values, output_hidden_states=self.blocks)
            feature = out.last_hidden_state[:, 0]
            blocks = tuple(out.hidden_states[1:]) if self.blocks else ()
        else:
            feature, blocks = vit.layernorm(forced[-1])[:, 0], ()
        return feature, self.model.classifier(feature), blocks, forced


def _start_metrics(output_dir: str | os.PathLike | None, model: nn.Module, teacher: Teacher,
                   eval_dataset: Any | None, headed: bool) -> dict[str, Any]:
    """Teacher and step-0 auxiliary accuracy (with logits) or feature R^2 (without), measured once and kept
    beside the checkpoints (a resumed run must not measure a half-trained model as "step 0")."""
    path = Path(output_dir) / METRICS_FILE if output_dir is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    metrics: dict[str, Any] = {}
    if eval_dataset is not None and headed:
        metrics["teacher_accuracy"] = round(accuracy(teacher, eval_dataset), 5)
        metrics["aux_accuracy_step0"] = round(accuracy(model, eval_dataset), 5)
        metrics["eval_images"] = len(eval_dataset)
        logger.info(f"teacher {metrics['teacher_accuracy']:.4f}, auxiliary model at step 0 "
                    f"{metrics['aux_accuracy_step0']:.4f}")
    elif eval_dataset is not None:
        metrics.update({f"aux_{k}_step0": v for k, v in feature_r2(model, teacher, eval_dataset).items()})
        metrics["eval_images"] = min(len(eval_dataset), R2_IMAGES)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
    return metrics
