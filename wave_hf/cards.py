"""Model cards rendered from the templates in ``wave_hf/model_cards/`` with ``huggingface_hub.ModelCard``.

The templates ship inside the package, so a wheel install writes the same cards as a checkout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .templates import TemplateBank

CARD_DIR = Path(__file__).resolve().parent / "model_cards"
TAGS = ["wave-hf", "wave", "weight-templates", "vit", "image-classification"]


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


def bank_card(bank: TemplateBank, repo_id: str = "path/to/bank", extra: str = "") -> ModelCard:
    cfg = bank.config
    data = ModelCardData(
        library_name="wave-hf",
        license="apache-2.0",
        tags=TAGS,
        base_model=cfg.teacher_name_or_path if cfg.teacher_name_or_path and "/" in cfg.teacher_name_or_path
        and not cfg.teacher_name_or_path.startswith("/") else None,
        datasets=[cfg.teacher_dataset] if cfg.teacher_dataset else None,
        pipeline_tag="image-classification",
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
