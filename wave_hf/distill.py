"""Stage 1: distil a teacher ViT into a ``TemplateBank`` through a Kronecker-constrained auxiliary model.

The auxiliary model has the teacher's depth and width, but every encoder tensor is rebuilt at each step
from the shared templates and the auxiliary scalers (docs/wave.md section 1(a)), so the gradients train
both. Two starts:

* ``init="teacher"`` (default; issue 8, lever 1): every teacher matrix type, stacked over layers, is
  replaced by its nearest Kronecker sum (Van Loan rank-N SVD, ``nearest_kronecker``; q/k/v are fused as rows
  ``[q; k; v]``), and every vector tensor by ``nearest_kronecker_vector`` (exact when
  ``num_vector_templates >= r``). The auxiliary model then starts close to the teacher, and distillation
  only has to recover what the rank-N constraint loses.
* ``init="scratch"``: ``TemplateBank(config)``, random (docs/wave.md section 8.1 rules).

Loss (docs/wave.md section 5 item 8): ``alpha * KL(softmax(z_t/T) || softmax(z_aux/T)) * T^2`` (batch mean)
``+ (1 - alpha) * CE(z_aux, y)``; a teacher without a classification head gives ``alpha * MSE`` on the final
CLS feature instead of the KL term. Weight decay applies to the matrix templates only: the product
``T kron S`` is bilinear, so decaying the templates fixes the scale split without shrinking the scalers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, ViTConfig, ViTForImageClassification, ViTModel
from transformers.utils import logging

from . import vit_layout
from .checkpoint import dataset_fingerprint, tensors_fingerprint
from .configuration_wave import WaveTemplateConfig
from .fold import parametrize_vit
from .kronecker import kron_matrix, nearest_kronecker, nearest_kronecker_vector
from .loop import Cosine, LoopSettings, run_loop
from .scalers import MATRIX_TYPES, vector_kinds
from .templates import TemplateBank
from .training import (
    check_dataset,
    check_labels,
    check_positive,
    dataset_batches,
    dataset_labels,
    dataset_num_labels,
    forward_output,
    predict,
)

logger = logging.get_logger(__name__)

Teacher = ViTForImageClassification | ViTModel
INITS = ("teacher", "scratch")
METRICS_FILE = "distill_metrics.json"


# -------------------------------------------------------------------------------------------- teacher
def load_teacher(teacher: str | os.PathLike | nn.Module) -> Teacher:
    """A ``ViTForImageClassification`` or ``ViTModel`` in eval mode, from a module, a folder or a repo id."""
    if isinstance(teacher, (ViTForImageClassification, ViTModel)):
        return teacher.eval()
    if isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a ViTForImageClassification or a ViTModel, got {type(teacher).__name__}")
    if not isinstance(teacher, (str, os.PathLike)):
        raise TypeError(f"teacher must be a path, a repo id or a ViT module, got {type(teacher).__name__}")
    name = os.fspath(teacher)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        raise FileNotFoundError(f"teacher {name!r} is not a local model folder or a reachable Hub repo: {err}") from err
    if not isinstance(config, ViTConfig):
        raise ValueError(f"teacher {name!r} is a {type(config).__name__} model; wave-hf distils ViTs (ViTConfig) only")
    archs = config.architectures or []
    cls = ViTModel if archs and not any("Classification" in a for a in archs) else ViTForImageClassification
    model = cls.from_pretrained(name)
    model.config._name_or_path = name
    return model.eval()


def teacher_has_head(teacher: Teacher) -> bool:
    return isinstance(teacher, ViTForImageClassification)


def _teacher_shape(teacher: Teacher) -> vit_layout.ViTShape:
    return vit_layout.shape_of(teacher.config)


def config_from_teacher(teacher: Teacher, **overrides: Any) -> WaveTemplateConfig:
    """A bank config whose geometry is the teacher's: auxiliary depth and width, image, patch, channels,
    LayerNorm eps, qkv bias, activation, head dim and MLP ratio. ``overrides`` set the other fields
    (defaults: ``template_width=64``, ``num_templates=6``, ``num_vector_templates=3``)."""
    teacher = load_teacher(teacher)
    s, c = _teacher_shape(teacher), teacher.config
    values: dict[str, Any] = dict(
        template_width=64, num_templates=6, num_vector_templates=3,
        head_dim=s.head_dim, mlp_ratio=s.mlp_ratio, image_size=s.image_size, patch_size=s.patch_size,
        num_channels=s.num_channels, layer_norm_eps=float(c.layer_norm_eps), qkv_bias=bool(c.qkv_bias),
        hidden_act=c.hidden_act, aux_depth=s.depth, aux_width=s.width,
        teacher_name_or_path=c._name_or_path or None,
    )
    values.update(overrides)
    if s.width % values["template_width"]:
        raise ValueError(f"template_width={values['template_width']} must divide the teacher's width {s.width}; "
                         "pass template_width= a divisor of it")
    config = WaveTemplateConfig(**values)
    check_teacher(config, teacher, init="teacher")
    return config


def check_teacher(config: WaveTemplateConfig, teacher: Teacher, init: str = "teacher") -> None:
    """Raise, naming the field, when the teacher's geometry cannot be distilled into ``config``."""
    s, c = _teacher_shape(teacher), teacher.config
    expected: dict[str, tuple[Any, Any]] = {
        "image_size": (config.image_size, s.image_size),
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
def _teacher_state(teacher: Teacher) -> dict[str, Tensor]:
    enc = vit_layout.encoder(teacher)
    return {vit_layout.ENCODER_PREFIX + k: v.detach().float() for k, v in enc.state_dict().items()}


@torch.no_grad()
def init_from_teacher(config: WaveTemplateConfig, teacher: Teacher, *, match_norms: bool = True) -> TemplateBank:
    """A bank whose auxiliary model is the nearest Kronecker-sum approximation of the teacher.

    Matrices: one rank-``num_templates`` Van Loan decomposition per type over the layer stack (templates
    shared across layers, scalers per layer). Vectors: ``nearest_kronecker_vector`` per tensor (exact when
    ``num_vector_templates >= r``). Deterministic: no random number is drawn.

    ``match_norms`` rescales each layer's scalers so that every approximated matrix keeps the teacher's
    Frobenius norm: truncation drops energy (for a teacher trained from a random init, mostly the
    incompressible init noise), which shrinks attention logits and MLP pre-activations layer after layer.
    """
    teacher = load_teacher(teacher)
    check_teacher(config, teacher, "teacher")
    state = _teacher_state(teacher)
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


def aux_model(bank: TemplateBank, num_labels: int, *, teacher: Teacher | None = None,
              id2label: dict[int, str] | None = None, train_templates: bool = False,
              seed: int = 0) -> ViTForImageClassification:
    """The auxiliary model: a ViT whose encoder reads ``bank``'s templates and auxiliary scalers.

    The classifier is the teacher's (copied) when it has one, else new (seeded). The model holds its
    own copy of the templates; its scalers are a copy of ``bank.aux`` too, so ``bank`` is never modified.
    """
    from .scalers import Scalers

    config = bank.config
    scalers = Scalers(config, config.aux_depth, config.aux_width)
    scalers.load_state_dict(bank.aux.state_dict())
    model = parametrize_vit(config, bank.templates, scalers, aux_vit_config(config, num_labels, id2label),
                            seed=seed, train_templates=train_templates)
    if teacher is not None and teacher_has_head(teacher):
        head = teacher.classifier
        if head.out_features != num_labels:
            raise ValueError(f"the teacher's classifier has {head.out_features} labels, num_labels={num_labels}")
        with torch.no_grad():
            model.classifier.weight.copy_(head.weight)
            model.classifier.bias.copy_(head.bias)
    return model


def distillation_loss(student: Tensor, teacher: Tensor, labels: Tensor | None, *, student_logits: Tensor | None = None,
                      temperature: float = 1.0, alpha: float = 0.5, feature: bool = False) -> Tensor:
    """``alpha * KD + (1 - alpha) * CE``; KD is ``KL(p_t || p_s) * T^2`` (batch mean) on logits, or MSE on
    CLS features when ``feature`` (headless teacher; ``student_logits`` then feeds the CE term)."""
    logits = student if student_logits is None else student_logits
    if feature:
        kd = nn.functional.mse_loss(student, teacher)
    else:
        t = temperature
        kd = nn.functional.kl_div(nn.functional.log_softmax(student / t, dim=-1),
                                  nn.functional.log_softmax(teacher / t, dim=-1),
                                  reduction="batchmean", log_target=True) * (t * t)
    if alpha >= 1.0 or labels is None:
        return kd
    ce = nn.functional.cross_entropy(logits, labels)
    return alpha * kd + (1.0 - alpha) * ce


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on a dataset of ``pixel_values``/``labels`` items."""
    logits, labels = predict(model, dataset, batch_size)
    return float((logits.argmax(-1) == labels).float().mean())


# ------------------------------------------------------------------------------------------- distill
def _num_labels(teacher: Teacher, train_dataset: Any) -> tuple[int, dict[int, str] | None]:
    if teacher_has_head(teacher):
        c = teacher.config
        id2label = {int(k): str(v) for k, v in c.id2label.items()} if c.id2label else None
        return teacher.classifier.out_features, id2label
    n, id2label = dataset_num_labels(train_dataset)
    if n is None:
        n = max(dataset_labels(train_dataset)) + 1
    return n, id2label


def distill(
    teacher: str | os.PathLike | Teacher,
    train_dataset: Any,
    *,
    config: WaveTemplateConfig | None = None,
    init: str = "teacher",
    steps: int = 1000,
    batch_size: int = 64,
    lr: float | None = None,
    weight_decay: float = 0.05,
    warmup_ratio: float = 0.05,
    temperature: float = 1.0,
    alpha: float = 0.5,
    eval_dataset: Any | None = None,
    dataset_name: str | None = None,
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 200,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TemplateBank:
    """Distil ``teacher`` into a ``TemplateBank`` (stage 1) and return it.

    Args:
        teacher: a ``ViTForImageClassification`` / ``ViTModel``, a local folder or a Hub repo id.
        train_dataset: map-style dataset of ``{"pixel_values": (C,H,W), "labels": int}`` items.
        config: the bank's config; default ``config_from_teacher(teacher)`` (template width 64, 6 matrix
            and 3 vector templates per type). Its geometry must match the teacher's (checked, per field).
        init: ``"teacher"`` (nearest-Kronecker decomposition of the teacher) or ``"scratch"`` (random).
        steps, batch_size: optimisation steps and *global* batch size (split across processes).
        lr: AdamW peak learning rate (default 5e-4, the sibling code's rate). Measured on the 12 x 192 ancestry:
            a rank-6..16 teacher start is still near chance at step 0 (12 layers compound the truncation), so
            the start needs a full-size rate to recover, not a gentle one.
        weight_decay: on the matrix templates only (none on scalers, vector templates or the head).
        warmup_ratio: linear warm-up share of ``steps``, then cosine decay to 0.
        temperature, alpha: KD temperature and weight; the loss is ``alpha*KD + (1-alpha)*CE``
            (``alpha=1``: pure KD as in the sibling code).
        eval_dataset: if given, teacher and auxiliary accuracy (at step 0 and at the end) go to
            ``config.metrics``.
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
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    temperature = check_positive("temperature", temperature)
    weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not (isinstance(warmup_ratio, (int, float)) and 0.0 <= warmup_ratio < 1.0):
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    lr = check_positive("lr", 5e-4 if lr is None else lr)
    settings = LoopSettings(steps=steps, lr=lr, batch_size=batch_size, schedule=Cosine(int(warmup_ratio * steps)),
                            seed=seed, output_dir=output_dir, checkpoint_every=checkpoint_every, max_steps=max_steps,
                            progress=progress, desc="distill")
    check_dataset(train_dataset)
    if eval_dataset is not None:
        check_dataset(eval_dataset, "eval_dataset")
    teacher = load_teacher(teacher)
    if config is None:
        config = config_from_teacher(teacher)
    elif not isinstance(config, WaveTemplateConfig):
        raise TypeError(f"config must be a WaveTemplateConfig, got {type(config).__name__}")
    check_teacher(config, teacher, init)
    num_labels, id2label = _num_labels(teacher, train_dataset)
    labels = dataset_labels(train_dataset)
    check_labels(labels, num_labels)

    if init == "teacher":
        bank = init_from_teacher(config, teacher)
    else:
        bank = TemplateBank(config)
        bank.reset_random(torch.Generator().manual_seed(seed))
    headed = teacher_has_head(teacher)
    model = aux_model(bank, num_labels, teacher=teacher, id2label=id2label, train_templates=True, seed=seed)
    teacher.requires_grad_(False)

    metrics = _start_metrics(output_dir, model, teacher, eval_dataset, headed)

    source = model.wave_source
    decay = list(source.templates.values())
    no_decay = list(source.scalers.parameters()) + list(model.classifier.parameters())
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def loss_fn(student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x, y = batch["pixel_values"], batch["labels"]
        with torch.no_grad():
            target = forward_output(teacher.to(x.device), x)
        feature, logits = student(x)
        if headed:
            return distillation_loss(logits, target, y, temperature=temperature, alpha=alpha)
        return distillation_loss(feature, target, y, student_logits=logits, alpha=alpha, feature=True)

    run_id = None
    if output_dir is not None:  # hashing the teacher and the data costs a little: only when checkpointing
        run_id = {
            "job": "distill", "init": init, "size": f"{config.aux_depth}x{config.aux_width}",
            "templates": f"{config.num_templates}x{config.template_width}",
            "vector_templates": config.num_vector_templates, "num_labels": num_labels,
            "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "temperature": temperature, "alpha": alpha,
            "teacher": tensors_fingerprint(teacher.state_dict()),
            "data": dataset_fingerprint(train_dataset, labels),
        }
    wrapper, log = run_loop(_FeatureAndLogits(model), groups, dataset_batches(train_dataset, settings), loss_fn,
                            settings, fingerprint=run_id)
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
    if eval_dataset is not None and headed:
        metrics["aux_accuracy"] = round(accuracy(model, eval_dataset), 5)
        if metrics.get("teacher_accuracy"):
            metrics["aux_over_teacher"] = round(metrics["aux_accuracy"] / metrics["teacher_accuracy"], 5)
        logger.info(f"auxiliary model after {log.steps_done} steps: {metrics['aux_accuracy']:.4f} "
                    f"(teacher {metrics['teacher_accuracy']:.4f})")
    bank.config.teacher_name_or_path = teacher.config._name_or_path or config.teacher_name_or_path
    if dataset_name is not None:
        bank.config.teacher_dataset = dataset_name
    bank.config.metrics = {**(config.metrics or {}), **metrics}
    return bank


class _FeatureAndLogits(nn.Module):
    """``x -> (final CLS feature, logits)`` in one forward, so DDP sees a single call per step."""

    def __init__(self, model: ViTForImageClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        feature = vit_layout.encoder(self.model)(pixel_values).last_hidden_state[:, 0]
        return feature, self.model.classifier(feature)


def _start_metrics(output_dir: str | os.PathLike | None, model: nn.Module, teacher: Teacher,
                   eval_dataset: Any | None, headed: bool) -> dict[str, Any]:
    """Teacher and step-0 auxiliary accuracy, measured once and kept beside the checkpoints (a resumed
    run must not measure a half-trained model as "step 0")."""
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
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
    return metrics
