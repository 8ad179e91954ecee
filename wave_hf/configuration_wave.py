"""``WaveTemplateConfig``: everything needed to rebuild any target ViT from a template bank."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


class WaveTemplateConfig(PreTrainedConfig):
    r"""Configuration of a WAVE template bank (arXiv 2406.17503).

    Templates are full ViT layer matrices at a small width ``template_width`` (``D_T``). A target of width
    ``D`` uses them through ``r x r`` scalers, ``r = D / D_T`` (``W = sum_t T_t kron S_t``), so ``D_T`` must
    divide every width you will build. The auxiliary model (the teacher-sized model the templates were
    distilled through) is recorded so that new sizes can start from its scalers.

    Args:
        template_width (`int`, defaults to 64): ``D_T``; every target width is a multiple of it.
        num_templates (`int`, defaults to 6): templates per matrix type (qkv, o, fc1, fc2). The paper
            ablates "template configurations"; 4-8 keep the bank at a few percent of the teacher.
        num_vector_templates (`int`, defaults to 3): templates per vector tensor (biases, LayerNorms,
            patch/position embeddings, CLS). Sums of several vector templates keep sibling units distinct
            (a single ``v kron s`` makes them exact copies; see docs/wave.md section 8).
        head_dim (`int`, defaults to 64): attention head size; a target's default head count is
            ``width // head_dim``.
        mlp_ratio (`int`, defaults to 4): MLP hidden size over width.
        image_size, patch_size, num_channels: the input geometry shared by every target.
        layer_norm_eps (`float`, defaults to 1e-6), qkv_bias (`bool`), hidden_act (`str`): copied into every
            target's ``ViTConfig``.
        aux_depth, aux_width (`int`): size of the auxiliary model; its scalers ship in the bank.
        teacher_name_or_path, teacher_dataset (`str`, optional): provenance, rendered into the model card.
        metrics (`dict`, optional): measured accuracies (teacher, auxiliary model, ...), for the card.
    """

    model_type = "wave_templates"

    template_width: int = 64
    num_templates: int = 6
    num_vector_templates: int = 3
    head_dim: int = 64
    mlp_ratio: int = 4
    image_size: int = 28
    patch_size: int = 7
    num_channels: int = 1
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    aux_depth: int = 12
    aux_width: int = 192
    teacher_name_or_path: str | None = None
    teacher_dataset: str | None = None
    metrics: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise on any value that could not build a ViT; messages name the field, value and range."""
        _check_int("template_width", self.template_width, 1, 65536)
        _check_int("num_templates", self.num_templates, 1, 1024)
        _check_int("num_vector_templates", self.num_vector_templates, 1, 1024)
        _check_int("head_dim", self.head_dim, 1, 65536)
        _check_int("mlp_ratio", self.mlp_ratio, 1, 64)
        _check_int("image_size", self.image_size, 1, 65536)
        _check_int("patch_size", self.patch_size, 1, self.image_size)
        _check_int("num_channels", self.num_channels, 1, 64)
        _check_int("aux_depth", self.aux_depth, 1, 1024)
        _check_int("aux_width", self.aux_width, 1, 1 << 20)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide image_size={self.image_size}"
            )
        if self.aux_width % self.template_width:
            raise ValueError(
                f"aux_width={self.aux_width} must be a multiple of template_width={self.template_width}"
            )
        if self.aux_width % self.head_dim:
            raise ValueError(f"aux_width={self.aux_width} must be a multiple of head_dim={self.head_dim}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1) or math.isnan(eps):
            raise ValueError(f"layer_norm_eps must be a float in (0, 1), got {eps!r}")
        if not isinstance(self.qkv_bias, bool):
            raise TypeError(f"qkv_bias must be a bool, got {self.qkv_bias!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(ACT2FN)}")

    @property
    def aux_ratio(self) -> int:
        return self.aux_width // self.template_width

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """Drop keys written by a newer wave-hf, with a warning, instead of failing (as peft does)."""
        known = {f.name for f in dataclasses.fields(cls)} | {"model_type", "transformers_version", "architectures"}
        base = set(PreTrainedConfig().to_dict())
        unknown = sorted(k for k in config_dict if k not in known and k not in base)
        if unknown:
            logger.warning(
                f"Ignoring unknown keys in a {cls.model_type} config (written by a newer wave-hf?): {unknown}"
            )
            config_dict = {k: v for k, v in config_dict.items() if k not in unknown}
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"config.json has model_type={model_type!r}; a template bank needs model_type={cls.model_type!r}"
            )
        return super().from_dict(config_dict, **kwargs)
