"""Teacher adapters: any pretrained ViT-family model as one ``Teacher`` that stage 1, stage 2 and every
baseline read the same way.

Why one adapter: a real teacher comes as a ``ViTModel``, a ``ViTForImageClassification`` (also how the
``facebook/deit-*`` non-distilled checkpoints ship), a DeiT class with its distillation token, or a
``Dinov2Model`` with layer scale, each at its own image size and with its own preprocessing. The rest of
wave-hf needs four things of it, and ``Teacher`` gives exactly those:

* ``encoder_state()``: the encoder as a **stock ViT state dict** (keys from ``vit_layout``), at the working
  image size. Dinov2's layer scale ``lambda`` is folded into ``o_proj``/``fc2`` (``W <- diag(lambda) W``,
  ``b <- lambda * b``), which is exact: ``h + lambda * (W x + b) = h + (diag(lambda) W) x + lambda * b``.
  A DeiT distillation token has no place in a stock ViT: it is dropped (``exact`` is then False, the only
  family for which the stock state is not the teacher's function).
* ``config``: a stock ``ViTConfig`` of that state (depth, width, heads, patch, image size, channels, eps,
  activation, qkv bias; ``num_labels`` of the head when there is one).
* ``preprocessing``: mean/std/resample from the image processor saved beside the checkpoint, else the
  family's stated defaults (``FAMILY_PREPROCESSING``, transformers' own processor defaults).
* ``forward(pixel_values, hidden_states=...)``: ``TeacherOutput`` with the per-block outputs (before the
  final LayerNorm, CLS first, DeiT's distillation token removed), the final LayerNorm output (its CLS row is
  the feature) and the logits when the teacher has a trained head.

**Resolution.** ``load_teacher(..., image_size=S)`` resamples the absolute position embeddings once, by
calling the family's own ``embeddings.interpolate_pos_encoding``; a stock ViT at ``S`` with the result
computes what the teacher computes at ``S`` with its on-the-fly interpolation (tests/test_teachers.py).

**Heads.** ``head="none"`` ignores a classifier; ``"logits"`` requires a trained one; ``"auto"`` keeps a
trained one and drops, with a warning, a classifier that the checkpoint did not contain (transformers
initialised it at random). ``Teacher.for_task(num_labels)`` then checks the head against the data: under
``"auto"`` a head over other labels is dropped with a warning (distil from features), under ``"logits"`` it
raises. Families that cannot map to a stock ViT (SwiGLU Dinov2, non-integer MLP ratios, other model types)
raise a ``ValueError`` naming the value.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.activations import ACT2FN
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
)

from . import vit_layout
from .data import Preprocessing
from .validation import MAX_IMAGE_SIZE, MAX_NUM_LABELS, check_int

HEAD_CHOICES = ("auto", "logits", "none")
#: Model classes by family, base model first; a folder's ``config.architectures`` picks among them.
FAMILY_CLASSES: dict[str, tuple[type[nn.Module], ...]] = {
    "vit": (ViTModel, ViTForImageClassification),
    "deit": (DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher),
    "dinov2": (Dinov2Model, Dinov2ForImageClassification),
}
FAMILY_CONFIGS: dict[type, str] = {ViTConfig: "vit", DeiTConfig: "deit", Dinov2Config: "dinov2"}
#: Preprocessing when the checkpoint has no image processor: each family's transformers processor defaults
#: (``ViTImageProcessor``: 0.5/0.5 bilinear; ``DeiTImageProcessor`` and the ``BitImageProcessor`` that the
#: facebook/dinov2-* checkpoints ship: ImageNet mean/std, bicubic).
FAMILY_PREPROCESSING = {
    "vit": Preprocessing(tuple(IMAGENET_STANDARD_MEAN), tuple(IMAGENET_STANDARD_STD), "bilinear",
                         "ViTImageProcessor defaults (no image processor with the checkpoint)"),
    "deit": Preprocessing(tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), "bicubic",
                          "DeiTImageProcessor defaults (no image processor with the checkpoint)"),
    "dinov2": Preprocessing(tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), "bicubic",
                            "DINOv2's BitImageProcessor defaults (no image processor with the checkpoint)"),
}
_ACCEPTED = ("a ViTForImageClassification or a ViTModel (or DeiTModel, DeiTForImageClassification[WithTeacher], "
             "Dinov2Model, Dinov2ForImageClassification, a Teacher, a model folder or a Hub repo id)")


@dataclass
class TeacherOutput:
    """What a teacher gives for a batch; ``hidden_states`` only when asked for.

    ``hidden_states[l]`` is block ``l``'s output ``(B, 1 + patches, D)`` before the final LayerNorm (what
    layer-wise distillation matches); ``embeddings`` is block 0's input (what a teacher-forced student's first
    block reads); ``last_hidden_state`` is after the final LayerNorm; ``logits`` is None without a head.
    """

    last_hidden_state: Tensor
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] = ()
    embeddings: Tensor | None = None

    @property
    def feature(self) -> Tensor:
        """The final CLS feature ``(B, D)``."""
        return self.last_hidden_state[:, 0]


class Teacher(nn.Module):
    """A teacher as wave-hf uses it; build it with ``load_teacher``. See the module docstring."""

    def __init__(self, *, family: str, encoder: nn.Module, config: ViTConfig, preprocessing: Preprocessing,
                 classifier: nn.Linear | None, head_input: str, distillation_classifier: nn.Linear | None = None,
                 native_image_size: int, head_status: str, name_or_path: str | None, source: nn.Module | None = None,
                 native: nn.Module | None = None):
        super().__init__()
        self.family, self.config, self.preprocessing = family, config, preprocessing
        self.encoder = encoder  # a stock ViTModel, except for DeiT: its own DeiTModel (distillation token)
        self.classifier = classifier
        self.distillation_classifier = distillation_classifier
        self.head_input = head_input  # "cls", "cls_and_patch_mean" (Dinov2) or "cls_and_distillation" (DeiT)
        self.native_image_size, self.head_status, self.name_or_path = native_image_size, head_status, name_or_path
        # The caller's own classifier (same weights) and the unresized source model, kept unregistered: the
        # first runs ``logits`` through the caller's forward (a subclass may memoise it), the second lets
        # ``load_teacher(teacher, image_size=...)`` resample from the native grid again, never twice.
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_native", native)
        self.requires_grad_(False)
        self.eval()

    def __repr__(self) -> str:
        c = self.config
        head = f"{self.num_labels} labels" if self.has_head else f"no head ({self.head_status})"
        return (f"Teacher({self.family}, {c.num_hidden_layers}x{c.hidden_size}, {c.num_attention_heads} heads, "
                f"patch {c.patch_size}, image {c.image_size} (native {self.native_image_size}), {head}, "
                f"{self.name_or_path!r})")

    # --------------------------------------------------------------------------------------- properties
    @property
    def has_head(self) -> bool:
        return self.classifier is not None

    @property
    def num_labels(self) -> int | None:
        return self.classifier.out_features if self.classifier is not None else None

    @property
    def exact(self) -> bool:
        """Whether ``encoder_state()`` computes the teacher's function (False: a DeiT distillation token)."""
        return self.family != "deit"

    @property
    def cls_classifier(self) -> nn.Linear | None:
        """The head when it is a linear map of the CLS feature (then a stock ViT head can copy it)."""
        return self.classifier if self.head_input == "cls" else None

    @property
    def shape(self) -> vit_layout.ViTShape:
        return vit_layout.shape_of(self.config)

    # ------------------------------------------------------------------------------------------ state
    @torch.no_grad()
    def encoder_state(self) -> dict[str, Tensor]:
        """The encoder as a stock ViT state dict (``vit_layout`` keys, float32, detached) at ``config.image_size``."""
        if self.family != "deit":
            return {vit_layout.ENCODER_PREFIX + k: v.detach().float() for k, v in self.encoder.state_dict().items()
                    if not k.startswith("pooler.")}
        base = self.encoder.state_dict()
        state = {key: base[name].detach().float() for key, name in _key_map(base, "deit", self.config).items()}
        state[vit_layout.global_key("pos")] = _positions(self.encoder, "deit", self.config.image_size)
        return state

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, pixel_values: Tensor, hidden_states: bool = False) -> TeacherOutput:
        """Features (and logits with a head) for a batch; per-block outputs only with ``hidden_states``."""
        if self.family == "deit":
            interpolate = self.config.image_size != self.native_image_size
            out = self.encoder(pixel_values, interpolate_pos_encoding=interpolate, output_hidden_states=hidden_states)
        else:
            out = self.encoder(pixel_values=pixel_values, output_hidden_states=hidden_states)
        sequence = out.last_hidden_state
        logits = self._logits(sequence) if self.has_head else None
        states = tuple(out.hidden_states) if hidden_states else ()
        extra = vit_layout.FAMILY_EXTRA_TOKENS[self.family]
        if extra:  # keep CLS and the patches: the tokens a stock ViT has
            keep = lambda h: torch.cat([h[:, :1], h[:, 1 + extra:]], dim=1)  # noqa: E731
            sequence, states = keep(sequence), tuple(keep(h) for h in states)
        return TeacherOutput(last_hidden_state=sequence, logits=logits, hidden_states=states[1:],
                             embeddings=states[0] if states else None)

    def _logits(self, sequence: Tensor) -> Tensor:
        if self.head_input == "cls_and_patch_mean":  # Dinov2ForImageClassification
            return self.classifier(torch.cat([sequence[:, 0], sequence[:, 1:].mean(dim=1)], dim=1))
        if self.head_input == "cls_and_distillation":  # DeiTForImageClassificationWithTeacher at inference
            return (self.classifier(sequence[:, 0]) + self.distillation_classifier(sequence[:, 1])) / 2
        return self.classifier(sequence[:, 0])

    def logits(self, pixel_values: Tensor) -> Tensor:
        """The teacher's logits; through the caller's own ``ViTForImageClassification`` when there is one."""
        if not self.has_head:
            raise ValueError(f"teacher {self.name_or_path!r} has no classification head ({self.head_status})")
        source = self._source
        if source is not None:
            return source(pixel_values=pixel_values).logits
        return self(pixel_values).logits

    # ------------------------------------------------------------------------------------------ heads
    def without_head(self) -> Teacher:
        """The same teacher (shared weights) with no head: features only."""
        out = copy.copy(self)
        out._modules = dict(self._modules)
        out.classifier = out.distillation_classifier = None
        object.__setattr__(out, "_source", None)
        out.head_status = "ignored (teacher_head='none')" if self.has_head else self.head_status
        return out

    def for_task(self, num_labels: int | None, id2label: dict[int, str] | None = None,
                 head: str = "auto") -> Teacher:
        """The teacher whose head (if any) serves data with ``num_labels`` classes named ``id2label``.

        ``"none"``: no head. ``"logits"``: the head must exist and predict ``num_labels`` classes, else
        ``ValueError``. ``"auto"``: a head over other labels (count, or names when both sides name them) looks
        untrained for this data: dropped with a warning, the teacher then teaches through its features.
        """
        head = check_head(head)
        if head == "none" or not self.has_head:
            if head == "logits":
                raise ValueError(f"teacher_head='logits' but teacher {self.name_or_path!r} has no trained "
                                 f"classification head ({self.head_status})")
            return self.without_head()
        if num_labels is None:
            return self
        mismatch = None
        if self.num_labels != num_labels:
            mismatch = f"the teacher predicts {self.num_labels} labels, the data has num_labels={num_labels}"
        elif id2label and _named(self.config.id2label) and _named(id2label):
            ours = [str(self.config.id2label[i]) for i in sorted(self.config.id2label)]
            theirs = [str(id2label[i]) for i in sorted(id2label)]
            if ours != theirs:
                mismatch = f"the teacher's labels {ours[:4]}... differ from the data's {theirs[:4]}..."
        if mismatch is None:
            return self
        if head == "logits":
            raise ValueError(f"{mismatch} (teacher_head='logits'); pass teacher_head='none' (or 'auto') to "
                             "distil from its features instead")
        warnings.warn(f"{mismatch}: its head is ignored and the teacher teaches through its features "
                      "(teacher_head='auto'; pass teacher_head='logits' to require the head)", stacklevel=2)
        return self.without_head()


def _named(id2label: dict | None) -> bool:
    """Whether labels carry real names (transformers' placeholders are ``LABEL_0``, ``LABEL_1``, ...)."""
    return bool(id2label) and any(str(v) != f"LABEL_{k}" for k, v in id2label.items())


def check_head(head: Any) -> str:
    if head not in HEAD_CHOICES:
        raise ValueError(f"teacher_head must be one of {list(HEAD_CHOICES)}, got {head!r}")
    return head


# ---------------------------------------------------------------------------------------------- loading
def load_teacher(teacher: Any, *, image_size: int | None = None, head: str = "auto") -> Teacher:
    """A ``Teacher`` (eval mode, no gradients) from a model, a ``Teacher``, a folder or a Hub repo id.

    Args:
        teacher: see ``_ACCEPTED``; a folder's ``config.architectures`` picks the class (the base model when
            it names none of the family's), and its ``preprocessor_config.json`` the preprocessing.
        image_size: work at this input size (a multiple of the patch size): the position embeddings are
            resampled once, as the family's own ``interpolate_pos_encoding`` does. Default: the teacher's.
        head: ``"auto"``, ``"logits"`` or ``"none"`` (module docstring); the data check is ``for_task``.

    A model object is used as it is (its weights are shared, not copied) when nothing needs converting.
    """
    head = check_head(head)
    if isinstance(teacher, Teacher):
        out = teacher
        if image_size is not None and image_size != teacher.config.image_size:  # from the native grid, once
            out = _from_model(teacher._native, image_size, teacher.preprocessing, teacher.name_or_path,
                              teacher.head_status)
            out = out if teacher.has_head else out.without_head()
        return _apply_head(out, head)
    if isinstance(teacher, nn.Module):
        family = _family_of_model(teacher)
        name = getattr(getattr(teacher, "config", None), "_name_or_path", None) or None
        preprocessing = folder_preprocessing(name, family) if name and os.path.isdir(name) else \
            FAMILY_PREPROCESSING[family]
        return _apply_head(_from_model(teacher, image_size, preprocessing, name, "trained"), head)
    if not isinstance(teacher, (str, os.PathLike)):
        raise TypeError(f"teacher must be {_ACCEPTED}, got {type(teacher).__name__}")
    name = os.fspath(teacher)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        raise FileNotFoundError(f"teacher {name!r} is not a local model folder or a reachable Hub repo: {err}") from err
    family = _family_of_config(config, name)
    classes = FAMILY_CLASSES[family]
    archs = list(getattr(config, "architectures", None) or [])
    cls = next((c for c in classes[1:] for a in archs if a == c.__name__), classes[0])
    if head == "none":
        cls = classes[0]
    kwargs = {"add_pooling_layer": False} if cls in (ViTModel, DeiTModel) else {}
    model, info = cls.from_pretrained(name, output_loading_info=True, **kwargs)
    model.config._name_or_path = name
    status = "trained" if cls is not classes[0] else "none (a headless model)"
    missing = [k for k in info.get("missing_keys", []) if "classifier" in k]
    if missing:
        status = f"missing: the checkpoint has no {missing[0]}, transformers initialised it at random"
    out = _from_model(model, image_size, folder_preprocessing(name, family), name, status)
    if missing:
        out = out.without_head()
        out.head_status = status
        if head == "logits":
            raise ValueError(f"teacher_head='logits' but teacher {name!r}'s classifier is {status}")
        warnings.warn(f"teacher {name!r}: its classifier is {status}; it teaches through its features "
                      "(teacher_head='auto')", stacklevel=2)
    return _apply_head(out, head)


def _apply_head(teacher: Teacher, head: str) -> Teacher:
    if head == "none":
        return teacher.without_head()
    if head == "logits" and not teacher.has_head:
        raise ValueError(f"teacher_head='logits' but teacher {teacher.name_or_path!r} has no trained classification "
                         f"head ({teacher.head_status})")
    return teacher


def _family_of_model(model: nn.Module) -> str:
    for family, classes in FAMILY_CLASSES.items():
        if isinstance(model, classes):
            return family
    raise TypeError(f"teacher must be {_ACCEPTED}, got {type(model).__name__}")


def _family_of_config(config: Any, name: str) -> str:
    family = next((f for c, f in FAMILY_CONFIGS.items() if type(config) is c), None)
    if family is None:
        raise ValueError(f"teacher {name!r} is a {type(config).__name__} model (model_type="
                         f"{getattr(config, 'model_type', None)!r}); wave-hf distils ViT, DeiT and Dinov2 models "
                         f"(model_type 'vit', 'deit', 'dinov2')")
    return family


def folder_preprocessing(name: str, family: str) -> Preprocessing:
    """Mean/std/resample of the image processor saved with the checkpoint, else the family's defaults."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        saved, _ = ImageProcessingMixin.get_image_processor_dict(name)
    except (OSError, ValueError):
        return FAMILY_PREPROCESSING[family]
    default = FAMILY_PREPROCESSING[family]
    return Preprocessing(tuple(saved.get("image_mean", default.image_mean)),
                         tuple(saved.get("image_std", default.image_std)),
                         saved.get("resample", default.resample), f"{name}/preprocessor_config.json")


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{what}={value!r}: wave-hf supports square images and patches only")
        value = value[0]
    return check_int(what, value, 1, MAX_IMAGE_SIZE)


def _stock_config(model: nn.Module, family: str, image_size: int) -> ViTConfig:
    """The stock ``ViTConfig`` of ``model``'s encoder at ``image_size``; unmappable values raise, named."""
    c = model.config
    if family == "dinov2" and getattr(c, "use_swiglu_ffn", False):
        raise ValueError("Dinov2 teacher with use_swiglu_ffn=True: a SwiGLU MLP (gate, up and down projections) "
                         "has no stock ViT counterpart; wave-hf distils Dinov2 models with use_swiglu_ffn=False")
    if not isinstance(c.hidden_act, str) or c.hidden_act not in ACT2FN:
        raise ValueError(f"teacher hidden_act={c.hidden_act!r} is not a transformers activation name")
    patch = _square(c.patch_size, "patch_size")
    if image_size % patch:
        raise ValueError(f"image_size={image_size} is not a multiple of the teacher's patch_size={patch}; pass "
                         f"image_size= a multiple of {patch} (e.g. {max(patch, image_size // patch * patch)})")
    intermediate = int(c.hidden_size * c.mlp_ratio) if family == "dinov2" else c.intermediate_size
    if intermediate % c.hidden_size:
        raise ValueError(f"teacher MLP size {intermediate} is not a multiple of hidden_size={c.hidden_size} "
                         f"(mlp_ratio={intermediate / c.hidden_size:g}); wave-hf supports integer MLP ratios only")
    if c.hidden_size % c.num_attention_heads:
        raise ValueError(f"teacher num_attention_heads={c.num_attention_heads} does not divide hidden_size="
                         f"{c.hidden_size}")
    shape = vit_layout.ViTShape(c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                intermediate // c.hidden_size, image_size, patch, c.num_channels)
    head = getattr(model, "classifier", None) or getattr(model, "cls_classifier", None)
    labels = head.out_features if isinstance(head, nn.Linear) else None
    id2label = None
    if labels is not None and c.id2label and len(c.id2label) == labels:
        id2label = {int(k): str(v) for k, v in c.id2label.items()}
    config = vit_layout.make_vit_config(shape, layer_norm_eps=float(c.layer_norm_eps), qkv_bias=bool(c.qkv_bias),
                                       hidden_act=c.hidden_act, num_labels=min(labels or 2, MAX_NUM_LABELS),
                                       id2label=id2label)
    config._name_or_path = c._name_or_path
    return config


def _positions(base: nn.Module, family: str, image_size: int) -> Tensor:
    """The position embeddings of CLS and the patches at ``image_size``, resampled by the family's own code."""
    emb = base.embeddings
    pos = emb.position_embeddings
    extra = vit_layout.FAMILY_EXTRA_TOKENS[family]
    patch = _square(base.config.patch_size, "patch_size")
    grid = image_size // patch
    with torch.no_grad():
        placeholder = pos.new_empty(1, 1, 1).expand(1, 1 + extra + grid * grid, pos.shape[-1])
        resampled = emb.interpolate_pos_encoding(placeholder, image_size, image_size).detach().float()
    return torch.cat([resampled[:, :1], resampled[:, 1 + extra:]], dim=1).clone()


@torch.no_grad()
def _from_model(model: nn.Module, image_size: int | None, preprocessing: Preprocessing, name: str | None,
                head_status: str) -> Teacher:
    family = _family_of_model(model)
    model.eval()
    base = getattr(model, "vit", None) or getattr(model, "deit", None) or getattr(model, "dinov2", None) or model
    native = _square(base.config.image_size, "image_size")
    size = native if image_size is None else check_int("image_size", image_size, 1, MAX_IMAGE_SIZE)
    config = _stock_config(model, family, size)
    classifier = getattr(model, "classifier", None) or getattr(model, "cls_classifier", None)
    classifier = classifier if isinstance(classifier, nn.Linear) else None
    head_input = {"dinov2": "cls_and_patch_mean"}.get(family, "cls")
    distillation = getattr(model, "distillation_classifier", None)
    distillation = distillation if isinstance(distillation, nn.Linear) and classifier is not None else None
    if distillation is not None:
        head_input = "cls_and_distillation"
    if classifier is None:
        head_status = head_status if head_status != "trained" else "none (a headless model)"
    source = None
    if family == "deit":
        encoder = base
    elif family == "vit" and size == native:
        encoder, source = base, (model if classifier is not None else None)
    else:
        encoder = vit_layout.encoder_from_state(config, _stock_state(base, family, config))
    return Teacher(family=family, encoder=encoder, config=config, preprocessing=preprocessing, classifier=classifier,
                   head_input=head_input, distillation_classifier=distillation,
                   native_image_size=native, head_status=head_status, name_or_path=name, source=source, native=model)


def _key_map(state: dict[str, Tensor], family: str, config: ViTConfig) -> dict[str, str]:
    """Stock ViT key -> the family's key, for every encoder tensor the model has (no q/k/v biases without
    ``qkv_bias``)."""
    keys = {key: vit_layout.family_key(family, key) for key in vit_layout.encoder_keys(config.num_hidden_layers)}
    return {key: name for key, name in keys.items() if name in state}


def _stock_state(base: nn.Module, family: str, config: ViTConfig) -> dict[str, Tensor]:
    """The stock ViT state of a ViT or Dinov2 base model at ``config.image_size``, layer scale folded."""
    state = base.state_dict()
    out = {key: state[name].detach().float().clone() for key, name in _key_map(state, family, config).items()}
    out[vit_layout.global_key("pos")] = _positions(base, family, config.image_size)
    if family == "dinov2":
        for layer in range(config.num_hidden_layers):
            for name in vit_layout.LAYER_SCALE_KEYS:
                scale = state[vit_layout.layer_scale_key(family, layer, name)].detach().float()
                out[vit_layout.layer_key(layer, name)].mul_(scale[:, None])
                out[vit_layout.layer_key(layer, f"{name}_bias")].mul_(scale)
    return out
