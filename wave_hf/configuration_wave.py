"""``WaveTemplateConfig``: everything needed to rebuild any target ViT from a template bank."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

from .validation import (
    MAX_CHANNELS,
    MAX_DEPTH,
    MAX_IMAGE_SIZE,
    MAX_MLP_RATIO,
    MAX_NUM_PATCHES,
    MAX_TEMPLATES,
    MAX_WIDTH,
    check_float,
    check_id2label,
    check_int,
)

logger = logging.get_logger(__name__)

#: Integer fields and their bounds (``patch_size`` is bounded by ``image_size`` on top).
INT_FIELDS = {
    "template_width": (1, MAX_WIDTH),
    "num_templates": (1, MAX_TEMPLATES),
    "num_vector_templates": (1, MAX_TEMPLATES),
    "head_dim": (1, MAX_WIDTH),
    "mlp_ratio": (1, MAX_MLP_RATIO),
    "image_size": (1, MAX_IMAGE_SIZE),
    "patch_size": (1, MAX_IMAGE_SIZE),
    "num_channels": (1, MAX_CHANNELS),
    "aux_depth": (1, MAX_DEPTH),
    "aux_width": (1, MAX_WIDTH),
}
#: Keys a bank's ``config.json`` must have: a missing one would silently take the default and describe
#: tensors of another shape than the ones in ``model.safetensors``.
REQUIRED_KEYS = ("model_type", *INT_FIELDS, "layer_norm_eps", "qkv_bias", "hidden_act")
_JSON_SCALARS = (str, int, float, bool, type(None))
#: JSON types of the other typed keys of ``config.json``, and how a message names them.
_JSON_TYPES = {
    "metrics": ((dict, type(None)), "an object or null"),
    "teacher_name_or_path": ((str, type(None)), "a string or null"),
    "teacher_dataset": ((str, type(None)), "a string or null"),
    "qkv_bias": ((bool,), "true or false"),
    "hidden_act": ((str,), "a string"),
    "layer_norm_eps": ((int, float), "a number"),
    "image_mean": ((list, type(None)), "a list of numbers or null"),
    "image_std": ((list, type(None)), "a list of numbers or null"),
    "resample": ((str, type(None)), "a string or null"),
    "teacher_image_size": ((int, type(None)), "an integer or null"),
}
#: Resize filters ``wave_hf.data`` implements (``torch.nn.functional.interpolate``, antialiased when shrinking).
RESAMPLE_MODES = ("nearest", "bilinear", "bicubic")
#: PIL's resampling enum (what a transformers image processor stores) -> the nearest mode above. LANCZOS,
#: BOX and HAMMING have no antialiased torch counterpart; bicubic/bilinear are the closest filters.
PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
#: What a bank without preprocessing fields (written before they existed) was trained with: ``(x/255 - 0.5)/0.5``.
DEFAULT_MEAN, DEFAULT_STD, DEFAULT_RESAMPLE = (0.5,), (0.5,), "bilinear"


def resample_name(value: Any) -> str:
    """A resize filter as one of ``RESAMPLE_MODES``, from a name or PIL's enum (an int, as processors save it)."""
    if isinstance(value, str):
        if value.lower() not in RESAMPLE_MODES:
            raise ValueError(f"resample={value!r} is not one of {list(RESAMPLE_MODES)} (or a PIL resampling int 0-5)")
        return value.lower()
    try:
        return PIL_RESAMPLE[check_int("resample", value, 0, 5)]
    except TypeError:
        raise TypeError(f"resample must be one of {list(RESAMPLE_MODES)} or a PIL resampling int 0-5, "
                        f"got {value!r}") from None


def check_preprocessing(image_mean: Any, image_std: Any, resample: Any, num_channels: int
                        ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """Validated ``(mean, std, resample)`` for images of ``num_channels`` channels; ``None`` means the default.

    ``mean``/``std`` hold one value per channel, or one value for all of them; a 3-value (RGB) pair on a grey
    model is averaged, because a grey model is fed the mean of the RGB channels (``wave_hf.data``).
    """
    out = []
    for name, values, default, low in (("image_mean", image_mean, DEFAULT_MEAN, None),
                                       ("image_std", image_std, DEFAULT_STD, 0.0)):
        if values is None:
            values = default
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [values]
        grey_from_rgb = num_channels == 1 and isinstance(values, (list, tuple)) and len(values) == 3
        if not isinstance(values, (list, tuple)) or len(values) not in (1, num_channels) and not grey_from_rgb:
            raise ValueError(f"{name} must be a list of 1 or {num_channels} numbers (one per channel), got {values!r}")
        numbers = [check_float(f"{name}[{i}]", v, low, None, low_open=low is not None) for i, v in enumerate(values)]
        if grey_from_rgb:
            numbers = [sum(numbers) / 3]
        out.append(tuple(numbers * num_channels if len(numbers) == 1 else numbers))
    return out[0], out[1], resample_name(DEFAULT_RESAMPLE if resample is None else resample)


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
        image_mean, image_std (`list[float]`, optional), resample (`str`, optional): the preprocessing of the
            teacher the bank was distilled from (its image processor's, or its family's stated defaults), so
            that ``wave_hf.data`` feeds every built model what the teacher saw. ``None`` (banks written before
            these fields existed) means wave-hf's original ``(x/255 - 0.5) / 0.5`` with a bilinear resize.
        teacher_image_size (`int`, optional): the teacher's own ``config.image_size``; ``image_size`` is the
            size the bank was distilled at (the teacher's position grid resampled to it once).
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
    image_mean: list | None = None
    image_std: list | None = None
    resample: str | None = None
    teacher_image_size: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise on any value that could not build a ViT; messages name the field, value and range.

        Integer fields are normalized to plain ints (numpy integers are accepted), so the config always
        serializes to JSON. The bounds are the documented limits of ``wave_hf.validation``.
        """
        for name, (low, high) in INT_FIELDS.items():
            if name == "patch_size":
                high = self.image_size
            setattr(self, name, check_int(name, getattr(self, name), low, high))
        patches = (self.image_size // self.patch_size) ** 2
        if patches > MAX_NUM_PATCHES:
            raise ValueError(f"image_size={self.image_size} with patch_size={self.patch_size} gives {patches} "
                             f"patches per image, above the limit of {MAX_NUM_PATCHES} (validation.MAX_NUM_PATCHES)")
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
        self.layer_norm_eps = check_float("layer_norm_eps", self.layer_norm_eps, 0, 1, low_open=True,
                                          high_open=True)
        if not isinstance(self.qkv_bias, bool):
            raise TypeError(f"qkv_bias must be a bool, got {self.qkv_bias!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(ACT2FN)}")
        if self.image_mean is not None or self.image_std is not None or self.resample is not None:
            if (self.image_mean is None) != (self.image_std is None):
                raise ValueError(f"image_mean and image_std go together, got image_mean={self.image_mean!r}, "
                                 f"image_std={self.image_std!r}")
            mean, std, resample = check_preprocessing(self.image_mean, self.image_std, self.resample,
                                                      self.num_channels)
            self.resample = resample
            if self.image_mean is not None:
                self.image_mean, self.image_std = list(mean), list(std)
        if self.teacher_image_size is not None:
            self.teacher_image_size = check_int("teacher_image_size", self.teacher_image_size, 1, MAX_IMAGE_SIZE)
        for name in ("teacher_name_or_path", "teacher_dataset"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {value!r} ({type(value).__name__})")
        if self.metrics is not None and (
            not isinstance(self.metrics, dict)
            or not all(isinstance(k, str) and isinstance(v, _JSON_SCALARS) for k, v in self.metrics.items())
        ):
            raise TypeError(f"metrics must be None or a dict of str -> number/str/bool, got {self.metrics!r}")

    @property
    def aux_ratio(self) -> int:
        return self.aux_width // self.template_width

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @staticmethod
    def check_json(config_dict: Any, overrides: dict[str, Any] | None = None) -> None:
        """Validate the raw content of a bank's ``config.json`` before transformers reads it.

        transformers would fail on a list with ``AttributeError``, on ``"dtype": 5`` deep inside the model
        load, and would fill a missing size key with its default (a config that no longer matches the
        weights). Every message names ``config.json`` and the key.
        """
        if not isinstance(config_dict, dict):
            raise ValueError(f"config.json must hold a JSON object {{...}}, got {type(config_dict).__name__}: "
                             f"{str(config_dict)[:80]}")
        present = set(config_dict) | set(overrides or {})
        missing = [key for key in REQUIRED_KEYS if key not in present]
        if missing:
            raise ValueError(f"config.json has no key {missing[0]!r} (missing: {missing}); a template bank's "
                             f"config.json needs {list(REQUIRED_KEYS)}")
        for key in ("dtype", "torch_dtype"):
            value = config_dict.get(key)
            is_dtype = isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)
            if value is not None and not is_dtype:
                raise ValueError(f"config.json key {key!r} must be a torch dtype name such as 'float32', "
                                 f"got {value!r}")
        for key, (low, high) in INT_FIELDS.items():
            if key in config_dict:
                try:
                    check_int(key, config_dict[key], low, high)
                except (TypeError, ValueError) as err:
                    raise type(err)(f"config.json key {key!r}: {err}") from None
        for key, (types, text) in _JSON_TYPES.items():
            value = config_dict.get(key)
            if key in config_dict and (not isinstance(value, types) or (isinstance(value, bool)
                                                                         and bool not in types)):
                raise TypeError(f"config.json key {key!r} must be {text}, got {value!r} ({type(value).__name__})")
        if config_dict.get("id2label") is not None:
            check_id2label(config_dict["id2label"], "config.json key 'id2label'")

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """transformers' reader, refusing a file that holds JSON but not an object (``null``, a list): the
        loader would otherwise fail on it with ``TypeError: argument of type 'NoneType' is not iterable``."""
        config_dict = super()._dict_from_json_file(json_file)
        if not isinstance(config_dict, dict):
            raise ValueError(f"{os.fspath(json_file)} must hold a JSON object {{...}}, got "
                             f"{type(config_dict).__name__}: {str(config_dict)[:80]}")
        return config_dict

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """Validate the raw dict (``check_json``), then drop keys written by a newer wave-hf, with a warning,
        instead of failing (as peft does)."""
        cls.check_json(config_dict, kwargs)
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
