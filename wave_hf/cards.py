"""Model cards rendered from the templates in ``wave_hf/model_cards/`` with ``huggingface_hub.ModelCard``.

The templates ship inside the package, so a wheel install writes the same cards as a checkout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedModel
from transformers.utils import logging

CARD_DIR = Path(__file__).resolve().parent / "model_cards"
TAGS = ["wave-hf", "wave", "weight-templates", "vit"]
#: the license of a bank distilled by this package when the teacher's is not recorded (the code's own)
DEFAULT_LICENSE = "apache-2.0"

logger = logging.get_logger(__name__)


def is_repo_id(name: object) -> bool:
    """True for a Hub repo id (``org/name``); false for free text, local paths and anything else."""
    if not isinstance(name, str) or name.count("/") != 1 or os.path.exists(name) or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def repo_ids(values: list[str | None], what: str) -> list[str] | None:
    """Only Hub repo ids go into card metadata; anything else is dropped with a warning saying so."""
    kept = [v for v in values if is_repo_id(v)]
    dropped = [v for v in values if v and not is_repo_id(v)]
    if dropped:
        logger.warning(f"model card: {what} {dropped} dropped from the metadata (not Hub repo ids)")
    return kept or None


def template_path(name: str) -> Path:
    path = CARD_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"model card template {path} is missing: reinstall wave-hf")
    return path


def metrics_table(metrics: dict[str, Any] | None) -> str:
    """A markdown table of measured numbers; empty when nothing was measured."""
    if not metrics:
        return "No measured metrics recorded yet."
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    return "## Measured\n\n| metric | value |\n|---|---|\n" + rows


def bank_card(bank: PreTrainedModel, repo_id: str = "path/to/bank", extra: str = "",
              license: str | None = None) -> ModelCard:
    """The card of a ``TemplateBank``: a bank is no pipeline model (no ``pipeline_tag``); ``base_model`` and ``datasets``
    only when they are Hub repo ids; a model-index for the measured auxiliary accuracy."""
    cfg = bank.config
    metrics = cfg.metrics or {}
    accuracy = metrics.get("aux_accuracy")
    evals = None
    if isinstance(accuracy, (int, float)) and cfg.teacher_dataset:
        evals = [EvalResult(task_type="image-classification", dataset_type=cfg.teacher_dataset,
                            dataset_name=cfg.teacher_dataset, metric_type="accuracy", metric_value=float(accuracy),
                            metric_name="auxiliary model accuracy")]
    data = ModelCardData(
        library_name="wave-hf",
        license=license or DEFAULT_LICENSE,
        tags=TAGS,
        base_model=(repo_ids([cfg.teacher_name_or_path], "base_model") or [None])[0],
        datasets=repo_ids([cfg.teacher_dataset], "datasets"),
        model_name=f"wave-bank-{cfg.num_templates}x{cfg.template_width}" if evals else None,
        eval_results=evals,
    )
    d, w = cfg.aux_depth, cfg.aux_width
    aux_matrix_params = d * (4 + 2 * cfg.mlp_ratio) * w * w
    params = bank.num_template_parameters
    return ModelCard.from_template(
        data,
        template_path=str(template_path("bank_card.md")),
        title="WAVE template bank" + (f" distilled from {cfg.teacher_name_or_path}" if cfg.teacher_name_or_path else ""),
        teacher=cfg.teacher_name_or_path or "none (random bank)",
        dataset=cfg.teacher_dataset or "none",
        template_width=cfg.template_width,
        num_templates=cfg.num_templates,
        num_vector_templates=cfg.num_vector_templates,
        aux_depth=d,
        aux_width=w,
        template_params=f"{params:,}",
        template_share=f"{100 * params / aux_matrix_params:.1f}%",
        num_channels=cfg.num_channels,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        metrics_table=metrics_table(cfg.metrics),
        repo_id=repo_id,
        extra=extra,
    )
