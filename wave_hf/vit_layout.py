"""The one module that knows how a transformers ViT names and shapes its tensors.

transformers 5 renamed the ViT weights (``vit.layers.N.attention.q_proj`` instead of
``vit.encoder.layer.N.attention.attention.query``) and converts old checkpoints at load time. Every
other module of wave-hf asks this one for keys and modules, so the next rename is a one-file change. It also
knows how the other teacher families (DeiT, Dinov2) name the same tensors (``family_key``), so that
``wave_hf.teachers`` can turn any of them into a stock ViT state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformers import ViTConfig, ViTForImageClassification, ViTModel
from transformers.models.vit.modeling_vit import ViTEmbeddings

from .validation import MAX_DEPTH, MAX_NUM_LABELS, MAX_WIDTH, check_id2label, check_int, check_memory

ENCODER_PREFIX = "vit."
CLASSIFIER = "classifier"
#: Prefix of every per-layer key (``vit.layers.N.``) and of every embedding key (patches, CLS, positions).
LAYERS_PREFIX = ENCODER_PREFIX + "layers."
EMBEDDINGS_PREFIX = ENCODER_PREFIX + "embeddings."

# Per-layer tensors, by the short names the rest of the library uses.
LAYER_MATRICES: dict[str, str] = {
    "q": "attention.q_proj.weight",
    "k": "attention.k_proj.weight",
    "v": "attention.v_proj.weight",
    "o": "attention.o_proj.weight",
    "fc1": "mlp.fc1.weight",
    "fc2": "mlp.fc2.weight",
}
LAYER_VECTORS: dict[str, str] = {
    "q_bias": "attention.q_proj.bias",
    "k_bias": "attention.k_proj.bias",
    "v_bias": "attention.v_proj.bias",
    "o_bias": "attention.o_proj.bias",
    "fc1_bias": "mlp.fc1.bias",
    "fc2_bias": "mlp.fc2.bias",
    "ln1_weight": "layernorm_before.weight",
    "ln1_bias": "layernorm_before.bias",
    "ln2_weight": "layernorm_after.weight",
    "ln2_bias": "layernorm_after.bias",
}
# Tensors outside the layers.
GLOBAL_TENSORS: dict[str, str] = {
    "patch_weight": "embeddings.patch_embeddings.projection.weight",
    "patch_bias": "embeddings.patch_embeddings.projection.bias",
    "cls": "embeddings.cls_token",
    "pos": "embeddings.position_embeddings",
    "final_ln_weight": "layernorm.weight",
    "final_ln_bias": "layernorm.bias",
}
# Linear layers and LayerNorms of one block, by short name -> module path inside the layer.
LAYER_LINEARS: dict[str, str] = {
    "q": "attention.q_proj",
    "k": "attention.k_proj",
    "v": "attention.v_proj",
    "o": "attention.o_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
LAYER_NORMS: dict[str, str] = {"ln1": "layernorm_before", "ln2": "layernorm_after"}
FINAL_NORM = "layernorm"

# Other teacher families (transformers 5.x), as keys of their base model (``Dinov2Model``, ``DeiTModel``): the
# one place that knows them, so that ``wave_hf.teachers`` can translate a teacher into the stock ViT keys above.
#: Prefix of layer ``N``'s keys in each family's base model.
FAMILY_LAYER_PREFIX = {"vit": "layers.{}.", "deit": "layers.{}.", "dinov2": "encoder.layer.{}."}
#: Per-layer module names that differ from ViT's, by family (``Dinov2Layer`` says norm1/norm2).
FAMILY_RENAMES = {"dinov2": {"layernorm_before.": "norm1.", "layernorm_after.": "norm2."}}
#: Dinov2's layer scale: ``h + lambda * o(attn)`` and ``h + lambda * fc2(mlp)``, by the matrix it multiplies.
LAYER_SCALE_KEYS = {"o": "layer_scale1.lambda1", "fc2": "layer_scale2.lambda1"}
#: Extra tokens a family's embeddings put between CLS and the patches (DeiT's distillation token).
FAMILY_EXTRA_TOKENS = {"vit": 0, "deit": 1, "dinov2": 0}


def layer_key(layer: int, name: str) -> str:
    """Full state-dict key of a per-layer tensor, e.g. ``layer_key(3, "q")``."""
    table = LAYER_MATRICES if name in LAYER_MATRICES else LAYER_VECTORS
    return f"{LAYERS_PREFIX}{layer}.{table[name]}"


def depth_position(key: str, depth: int) -> int:
    """Where a ``ViTForImageClassification`` parameter sits along the network, for layer-wise lr decay (BEiT's
    layer id): 0 for the embeddings (patch projection, CLS token, positions), ``l + 1`` for block ``l``
    (``0 <= l < depth``), ``depth + 1`` for everything after the blocks (final LayerNorm, classifier, a pooler).
    A block index outside the model's depth raises (the key is not from a model of this depth)."""
    if key.startswith(LAYERS_PREFIX):
        index = key[len(LAYERS_PREFIX):].split(".", 1)[0]
        if not index.isdigit() or int(index) >= depth:
            raise ValueError(f"{key!r} is not a parameter of a ViT with {depth} layers")
        return int(index) + 1
    return 0 if key.startswith(EMBEDDINGS_PREFIX) else depth + 1


def global_key(name: str) -> str:
    """Full state-dict key of a tensor outside the layers, e.g. ``global_key("pos")``."""
    return ENCODER_PREFIX + GLOBAL_TENSORS[name]


def encoder_keys(depth: int) -> list[str]:
    """Every encoder key of a ViT of this depth, in a fixed order (the classifier excluded)."""
    keys = [global_key(n) for n in GLOBAL_TENSORS]
    for layer in range(depth):
        keys += [layer_key(layer, n) for n in LAYER_MATRICES]
        keys += [layer_key(layer, n) for n in LAYER_VECTORS]
    return keys


def family_key(family: str, key: str) -> str:
    """The key in ``family``'s base model (``ViTModel``, ``DeiTModel``, ``Dinov2Model``) of the tensor that a
    stock ViT calls ``key`` (a ``global_key``/``layer_key``, with the ``vit.`` prefix)."""
    if family not in FAMILY_LAYER_PREFIX:
        raise ValueError(f"unknown teacher family {family!r}; known: {sorted(FAMILY_LAYER_PREFIX)}")
    short = key.removeprefix(ENCODER_PREFIX)
    if not short.startswith("layers."):
        return short
    _, layer, rest = short.split(".", 2)
    for old, new in FAMILY_RENAMES.get(family, {}).items():
        rest = rest.replace(old, new, 1) if rest.startswith(old) else rest
    return FAMILY_LAYER_PREFIX[family].format(layer) + rest


def layer_scale_key(family: str, layer: int, name: str) -> str:
    """Base-model key of the layer scale that multiplies matrix ``name`` (``"o"`` or ``"fc2"``) of ``layer``."""
    return FAMILY_LAYER_PREFIX[family].format(layer) + LAYER_SCALE_KEYS[name]


def resample_positions(pos: Tensor, image_size: int, patch_size: int) -> Tensor:
    """``(1, 1 + n, D)`` position embeddings of a square grid resampled for ``image_size`` pixels.

    It *is* transformers' ``ViTEmbeddings.interpolate_pos_encoding`` (bicubic, ``align_corners=False``, to the
    new grid's size), so a stock ViT built with the result computes what the source model computes with
    ``interpolate_pos_encoding=True``; transformers 5's Dinov2 resamples the same way. Differentiable, so
    trainable position templates can be fitted through it. The same size returns ``pos`` itself.
    """
    if image_size % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
    grid = image_size // patch_size
    owner = SimpleNamespace(position_embeddings=pos, patch_size=patch_size)
    placeholder = pos.new_empty(1, 1, 1).expand(1, grid * grid + 1, pos.shape[-1])  # only its shape is read
    return ViTEmbeddings.interpolate_pos_encoding(owner, placeholder, image_size, image_size)


def layer_tensor_names() -> list[str]:
    """Short names of every per-layer tensor (matrices first, then vectors), in a fixed order."""
    return list(LAYER_MATRICES) + list(LAYER_VECTORS)


def with_size(shape: ViTShape, depth: int, width: int, num_heads: int | None = None) -> ViTShape:
    """The same geometry (patch, image, channels, MLP ratio) at another depth/width/head count.

    The default head count keeps ``shape``'s head size, so that a model derived from a teacher has the
    teacher's head_dim. Raises when the size cannot be a ViT (heads not dividing the width).
    """
    depth = check_int("depth", depth, 1, MAX_DEPTH)
    width = check_int("width", width, 1, MAX_WIDTH)
    if num_heads is None:
        if width % shape.head_dim:
            raise ValueError(
                f"width={width} is not a multiple of head_dim={shape.head_dim}; pass num_heads dividing {width}"
            )
        num_heads = width // shape.head_dim
    num_heads = check_int("num_heads", num_heads, 1, width)
    if width % num_heads:
        divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
        raise ValueError(f"num_heads={num_heads!r} does not divide width={width}; accepted: {divisors}")
    return ViTShape(depth, width, num_heads, shape.mlp_ratio, shape.image_size, shape.patch_size,
                    shape.num_channels)


def classifier_keys() -> list[str]:
    return [f"{CLASSIFIER}.weight", f"{CLASSIFIER}.bias"]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The block list of a ``ViTForImageClassification`` or a ``ViTModel``."""
    vit = model.vit if hasattr(model, "vit") else model
    return vit.layers


def encoder(model: nn.Module) -> nn.Module:
    """The ``ViTModel`` inside a ``ViTForImageClassification`` (or the model itself)."""
    return model.vit if hasattr(model, "vit") else model


def submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


@dataclass(frozen=True)
class ViTShape:
    """The size of a ViT as the rest of the library talks about it."""

    depth: int
    width: int
    num_heads: int
    mlp_ratio: int
    image_size: int
    patch_size: int
    num_channels: int

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


def shape_of(config: ViTConfig) -> ViTShape:
    """Read a ``ViTConfig`` into a ``ViTShape``; an MLP that is not an integer multiple raises."""
    if config.intermediate_size % config.hidden_size:
        raise ValueError(
            f"intermediate_size={config.intermediate_size} is not a multiple of hidden_size="
            f"{config.hidden_size}; wave-hf supports integer MLP ratios only"
        )
    return ViTShape(
        depth=config.num_hidden_layers,
        width=config.hidden_size,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size // config.hidden_size,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
    )


def make_vit_config(
    shape: ViTShape,
    *,
    layer_norm_eps: float = 1e-12,
    qkv_bias: bool = True,
    hidden_act: str = "gelu",
    num_labels: int = 10,
    id2label: dict[int, str] | None = None,
) -> ViTConfig:
    """A stock ``ViTConfig``: the model it describes loads with plain transformers.

    ``id2label`` (validated by ``validation.check_id2label``) sets the labels; without it ``num_labels``
    does, an int in ``[1, MAX_NUM_LABELS]``.
    """
    if id2label is not None:
        id2label = check_id2label(id2label)
        num_labels = len(id2label)
    num_labels = check_int("num_labels", num_labels, 1, MAX_NUM_LABELS)
    kwargs = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    return ViTConfig(
        hidden_size=shape.width,
        num_hidden_layers=shape.depth,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.mlp_ratio * shape.width,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        num_channels=shape.num_channels,
        layer_norm_eps=layer_norm_eps,
        qkv_bias=qkv_bias,
        hidden_act=hidden_act,
        num_labels=num_labels,
        **kwargs,
    )


def tensor_shapes(shape: ViTShape, num_labels: int | None = None) -> dict[str, tuple[int, ...]]:
    """Expected shape of every key, computed without building a model."""
    d, h = shape.width, shape.mlp_ratio * shape.width
    out: dict[str, tuple[int, ...]] = {
        global_key("patch_weight"): (d, shape.num_channels, shape.patch_size, shape.patch_size),
        global_key("patch_bias"): (d,),
        global_key("cls"): (1, 1, d),
        global_key("pos"): (1, shape.num_tokens, d),
        global_key("final_ln_weight"): (d,),
        global_key("final_ln_bias"): (d,),
    }
    per_layer = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "fc1": (h, d), "fc2": (d, h),
                 "fc1_bias": (h,)}
    for layer in range(shape.depth):
        for name in list(LAYER_MATRICES) + list(LAYER_VECTORS):
            out[layer_key(layer, name)] = per_layer.get(name, (d,))
    if num_labels is not None:
        out[f"{CLASSIFIER}.weight"] = (num_labels, d)
        out[f"{CLASSIFIER}.bias"] = (num_labels,)
    return out


def parameter_count(shape: ViTShape, num_labels: int) -> int:
    """Parameters of a ``ViTForImageClassification`` of this shape, computed without building it."""
    return sum(math.prod(size) for size in tensor_shapes(shape, num_labels).values())


def check_buildable(shape: ViTShape, num_labels: int, copies: int = 2) -> None:
    """Refuse, before anything is allocated, a model whose ``copies`` float32 copies of every weight (the
    assembled or selected state plus the model that takes it) do not fit in the available memory."""
    check_memory(4 * copies * parameter_count(shape, num_labels),
                 f"a ViT of depth={shape.depth}, width={shape.width} with {num_labels} labels")


def empty_classifier(config: ViTConfig) -> ViTForImageClassification:
    """A ``ViTForImageClassification`` on the meta device: no memory, no random init to overwrite."""
    with torch.device("meta"):
        return ViTForImageClassification(config)


def encoder_from_state(config: ViTConfig, state: dict[str, Tensor]) -> ViTModel:
    """A stock ``ViTModel`` (no pooler) holding ``state`` (``vit.``-prefixed encoder keys), in eval mode.

    Built on the meta device and filled with ``assign=True``: nothing is initialized to be overwritten, and
    ``strict`` catches a missing or extra key."""
    with torch.device("meta"):
        model = ViTModel(config, add_pooling_layer=False)
    model.load_state_dict({k.removeprefix(ENCODER_PREFIX): v for k, v in state.items()}, strict=True, assign=True)
    return model.eval()
