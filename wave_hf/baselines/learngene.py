"""``tleg_learngene``: TLEG as its paper defines it (Xia et al., "Transformer as Linear Expansion of Learngene",
AAAI 2024).

TLEG's claim is that a network trained *under* the linear-expansion constraint packs its knowledge into two
layers, a *learngene* ``(A, B)``, from which a model of any depth starts as ``W_l = A + (l / L) B``. The ``tleg``
row (a line fitted afterwards to WAVE's auxiliary model) cannot test that claim; this one trains the learngene:

* the auxiliary model is a stock ViT of the ancestry's depth whose layer ``l`` reads ``A + (l / L) B`` for every
  matrix, bias and LayerNorm (TLEG's ``utils.py: gene_tranfer``, docs/wave.md section 3); the patch and position
  embeddings, the CLS token and the final LayerNorm are its own, and descendants copy them unchanged;
* it is distilled from the ancestry's logits with TLEG's loss, soft KD with ``alpha = 1`` and ``tau = 1``;
* a learngene has one width, as in TLEG, which trains one per width: a descendant takes any depth at that width.

TLEG trains from scratch. ``init="teacher"`` (the default where the width allows) starts from the
least-squares line through the teacher's layers after Weight Selection to the learngene's width. WAVE's bank
starts from the teacher's nearest-Kronecker decomposition, so this gives both the same kind of head start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.func import functional_call
from transformers import ViTConfig, ViTForImageClassification

from .. import vit_layout
from ..distill import kl_loss, r2_score, standardized_mse, task_labels
from ..io import HubMixin
from ..loop import Cosine, LoopSettings, run_loop
from ..teachers import load_teacher
from ..training import accuracy, check_dataset, dataset_batches, dataset_labels, dataset_num_labels, predict
from ..validation import MAX_DEPTH, MAX_WIDTH, check_choice, check_float, check_int
from .common import config_like, model_from_encoder
from .registry import InitRequest, register_init_method
from .tleg import linear_fit
from .weight_selection import select_encoder

FORMAT = "wave-hf-learngene-v1"
INITS = ("auto", "teacher", "scratch")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
#: Tensors that take weight decay (timm's rule, which TLEG's DeiT code follows: matrices yes, vectors no).
DECAYED = ("q", "k", "v", "o", "fc1", "fc2")


def _param_name(key: str) -> str:
    return key.replace(".", "__")  # ParameterDict keys cannot hold dots


class Learngene(nn.Module, HubMixin):
    """Two layers ``(base, slope)`` per layer tensor plus the global tensors; ``expand(depth)`` is a descendant's
    encoder state. Saved as ``config.json`` + ``model.safetensors`` (``save_pretrained`` / ``from_pretrained``,
    folder or Hub repo id)."""

    owned_files = ("config.json", "model.safetensors")

    def __init__(self, shape: vit_layout.ViTShape, *, qkv_bias: bool = True, layer_norm_eps: float = 1e-6,
                 hidden_act: str = "gelu", metrics: dict[str, Any] | None = None):
        super().__init__()
        check_int("depth", shape.depth, 2, MAX_DEPTH)  # one layer has no slope to learn
        check_int("width", shape.width, 1, MAX_WIDTH)
        self.shape = vit_layout.with_size(shape, shape.depth, shape.width, shape.num_heads)
        self.qkv_bias = bool(qkv_bias)
        self.layer_norm_eps = check_float("layer_norm_eps", layer_norm_eps, 0.0, 1.0)
        self.hidden_act = check_choice("hidden_act", hidden_act, HIDDEN_ACTS)
        self.metrics = dict(metrics or {})
        shapes = vit_layout.tensor_shapes(self.shape)
        self.base, self.slope, self.globals = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for name in self.layer_names:
            size = shapes[vit_layout.layer_key(0, name)]
            self.base[name] = nn.Parameter(torch.ones(size) if name.startswith("ln") and "weight" in name
                                           else torch.zeros(size))
            self.slope[name] = nn.Parameter(torch.zeros(size))
        for name in vit_layout.GLOBAL_TENSORS:
            size = shapes[vit_layout.global_key(name)]
            self.globals[name] = nn.Parameter(torch.ones(size) if name == "final_ln_weight" else torch.zeros(size))

    @property
    def layer_names(self) -> list[str]:
        names = vit_layout.layer_tensor_names()
        return names if self.qkv_bias else [n for n in names if n not in ("q_bias", "k_bias", "v_bias")]

    @property
    def width(self) -> int:
        return self.shape.width

    def vit_config(self, depth: int | None = None, num_labels: int = 10,
                   id2label: dict[int, str] | None = None) -> ViTConfig:
        """The stock config of a descendant of ``depth`` layers (default: the auxiliary model's)."""
        shape = vit_layout.with_size(self.shape, depth or self.shape.depth, self.width, self.shape.num_heads)
        return vit_layout.make_vit_config(shape, layer_norm_eps=self.layer_norm_eps, qkv_bias=self.qkv_bias,
                                          hidden_act=self.hidden_act, num_labels=num_labels, id2label=id2label)

    def expand(self, depth: int) -> dict[str, Tensor]:
        """A descendant's encoder state: layer ``l`` is ``base + (l / depth) slope`` (TLEG's ``l = 0 .. L-1``),
        the global tensors are copied. Differentiable, so the auxiliary model trains through it."""
        depth = check_int("depth", depth, 1, MAX_DEPTH)
        state = {vit_layout.global_key(n): p for n, p in self.globals.items()}
        for layer in range(depth):
            for name in self.layer_names:
                state[vit_layout.layer_key(layer, name)] = self.base[name] + (layer / depth) * self.slope[name]
        return state

    @torch.no_grad()
    def set_from_state(self, state: dict[str, Tensor]) -> Learngene:
        """``(base, slope)`` as the least-squares line through a stock encoder state of the auxiliary depth
        (``tleg.linear_fit``); the global tensors copied."""
        for name in self.layer_names:
            stack = torch.stack([state[vit_layout.layer_key(i, name)] for i in range(self.shape.depth)])
            base, slope = linear_fit(stack)
            self.base[name].copy_(base)
            self.slope[name].copy_(slope)
        for name in vit_layout.GLOBAL_TENSORS:
            self.globals[name].copy_(state[vit_layout.global_key(name)])
        return self

    # ------------------------------------------------------------------------------------------ I/O
    def _config_dict(self) -> dict[str, Any]:
        s = self.shape
        return {"format": FORMAT, "depth": s.depth, "width": s.width, "num_heads": s.num_heads,
                "mlp_ratio": s.mlp_ratio, "image_size": s.image_size, "patch_size": s.patch_size,
                "num_channels": s.num_channels, "qkv_bias": self.qkv_bias, "layer_norm_eps": self.layer_norm_eps,
                "hidden_act": self.hidden_act, "metrics": self.metrics}

    def _save_pretrained(self, save_directory: Path) -> None:
        tensors = {f"{group}.{name}": p.detach().contiguous().cpu()
                   for group in ("base", "slope", "globals") for name, p in getattr(self, group).items()}
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"learngene tensor {bad[0]} contains NaN or Inf; nothing saved")
        save_file(tensors, os.fspath(save_directory / "model.safetensors"), metadata={"format": FORMAT})
        (save_directory / "config.json").write_text(json.dumps(self._config_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def _from_folder(cls, folder: Path, name: str, **kwargs: Any) -> Learngene:
        if kwargs:
            raise TypeError(f"Learngene.from_pretrained got unexpected keywords {sorted(kwargs)}")
        path = folder / "config.json"
        try:
            raw = json.loads(path.read_text()) if path.stat().st_size <= 1 << 20 else None
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{name}: config.json is not a readable JSON file ({err})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{name} is not a wave-hf learngene (config.json format={got!r}, expected {FORMAT!r})")
        ints = {k: check_int(k, raw.get(k), 1, MAX_WIDTH) for k in ("depth", "width", "num_heads", "mlp_ratio",
                                                                     "image_size", "patch_size", "num_channels")}
        metrics = raw.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise ValueError(f"{name}: config.json metrics must be a JSON object, got {type(metrics).__name__}")
        qkv_bias = raw.get("qkv_bias", True)
        if not isinstance(qkv_bias, bool):
            raise ValueError(f"{name}: config.json qkv_bias must be true or false, got {qkv_bias!r}")
        gene = cls(vit_layout.ViTShape(**ints), qkv_bias=qkv_bias, layer_norm_eps=raw.get("layer_norm_eps", 1e-6),
                   hidden_act=raw.get("hidden_act", "gelu"), metrics=metrics)
        expected = {f"{g}.{n}": tuple(p.shape) for g in ("base", "slope", "globals")
                    for n, p in getattr(gene, g).items()}
        tensors = load_file(os.fspath(folder / "model.safetensors"))
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            wrong = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
            raise ValueError(f"{name}: model.safetensors does not match config.json (first mismatch: {wrong[0]})")
        with torch.no_grad():
            for key, value in tensors.items():
                if not torch.isfinite(value).all():
                    raise ValueError(f"{name}: tensor {key} contains NaN or Inf")
                group, tensor_name = key.split(".", 1)
                getattr(gene, group)[tensor_name].copy_(value)
        return gene


class _AuxiliaryModel(nn.Module):
    """The learngene's auxiliary model: a stock ViT run on ``gene.expand(depth)`` (``functional_call``), so
    every layer's gradient flows into the one ``(base, slope)`` pair. ``x -> (logits, final CLS feature mapped
    to the teacher's width)``; the map exists only for a teacher without logits (discarded after training)."""

    def __init__(self, gene: Learngene, classifier_model: ViTForImageClassification, project: nn.Linear | None):
        super().__init__()
        self.gene, self.vit, self.project = gene, classifier_model, project
        self.vit.vit.requires_grad_(False)  # placeholders: the encoder's values come from the learngene

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        prefix = vit_layout.ENCODER_PREFIX
        state = {k.removeprefix(prefix): v for k, v in self.gene.expand(self.gene.shape.depth).items()}
        feature = functional_call(self.vit.vit, state, (pixel_values,), strict=False).last_hidden_state[:, 0]
        return self.vit.classifier(feature), (self.project(feature) if self.project is not None else None)


def train_learngene(
    teacher: Any,
    train_dataset: Any,
    width: int,
    *,
    num_heads: int | None = None,
    init: str = "auto",
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    warmup_ratio: float = 0.05,
    temperature: float = 1.0,
    image_size: int | None = None,
    seed: int = 0,
    eval_dataset: Any | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Learngene:
    """Train a TLEG learngene of ``width`` by distillation from ``teacher`` (module docstring).

    A teacher with logits for the data's labels teaches as in TLEG (soft KD); one without (a headless DINOv2)
    teaches through its final CLS feature: ``standardized_mse`` of the learngene's CLS feature, mapped to the
    teacher's width by a linear map trained with it and then discarded, as ``wave_hf.fit`` does.

    ``init``: ``"teacher"`` (line through the Weight-Selected teacher; needs ``width`` <= the teacher's),
    ``"scratch"`` (TLEG's random start: a stock ViT's init, seeded) or ``"auto"`` (teacher where possible).
    The auxiliary depth is the teacher's. The optimiser settings default to those of ``wave_hf.distill``;
    ``output_dir`` holds resumable checkpoints (the shared training loop's). With ``eval_dataset``, the
    teacher's and the auxiliary model's accuracy on it (with logits) or the mapped CLS feature's R^2 (without)
    go to ``metrics``, as ``distill`` records them. ``image_size``: work at this input size (a multiple of the
    teacher's patch size; default the teacher's); the learngene builds at that size.
    """
    init = check_choice("init", init, INITS)
    check_dataset(train_dataset)
    if eval_dataset is not None:
        check_dataset(eval_dataset, "eval_dataset")
    teacher = load_teacher(teacher, image_size=image_size)
    teacher = teacher.for_task(*task_labels(teacher, train_dataset))
    headed = teacher.has_head
    source = teacher.shape
    width = check_int("width", width, 1, MAX_WIDTH)
    if init == "auto":
        init = "teacher" if width <= source.width else "scratch"
    if init == "teacher" and width > source.width:
        raise ValueError(f"init='teacher' selects from the teacher, so width must be in [1, {source.width}], got "
                         f"{width}; use init='scratch' for a wider learngene")
    temperature = check_float("temperature", temperature, 1e-3, 100.0)
    settings = LoopSettings(steps=steps, lr=lr, batch_size=batch_size, schedule=Cosine(int(warmup_ratio * steps)),
                            seed=seed, output_dir=output_dir, progress=progress, desc=f"learngene w{width}")
    if headed:
        num_labels = teacher.num_labels
        id2label = {int(k): str(v) for k, v in (teacher.config.id2label or {}).items()} or None
    else:
        num_labels, id2label = dataset_num_labels(train_dataset)
        num_labels = num_labels if num_labels is not None else max(dataset_labels(train_dataset)) + 1
    config = config_like(teacher.config, source.depth, width, num_heads, num_labels, id2label)
    shape = vit_layout.shape_of(config)
    gene = Learngene(shape, qkv_bias=config.qkv_bias, layer_norm_eps=config.layer_norm_eps,
                     hidden_act=config.hidden_act)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        stock = ViTForImageClassification(config)  # the random start, and the module the auxiliary model runs
    state = select_encoder(teacher, shape) if init == "teacher" else {
        k: v for k, v in stock.state_dict().items() if k.startswith(vit_layout.ENCODER_PREFIX)}
    gene.set_from_state(state)
    if init == "scratch":  # a line from two random layers: TLEG's randomly initialised learngene
        with torch.no_grad():
            for name in gene.layer_names:
                gene.base[name].copy_(state[vit_layout.layer_key(0, name)])
                gene.slope[name].copy_(state[vit_layout.layer_key(1, name)])
    head = teacher.cls_classifier
    if head is not None and head.in_features == width:
        with torch.no_grad():
            stock.classifier.load_state_dict(head.state_dict())
    project = None if headed else nn.Linear(width, source.width)
    if not headed:
        stock.classifier.requires_grad_(False)  # no labels are used: the head would only drift
    model = _AuxiliaryModel(gene, stock, project)
    decay = [p for g in (gene.base, gene.slope) for n, p in g.items() if n in DECAYED]
    decay.append(gene.globals["patch_weight"])
    ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def loss_fn(student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x = batch["pixel_values"]
        with torch.no_grad():
            target = teacher.to(x.device)(x)
        logits, feature = student(x)
        if headed:
            return kl_loss(logits, target.logits, temperature)
        return standardized_mse(feature, target.feature)

    fingerprint = {"job": "tleg_learngene", "width": width, "init": init, "weight_decay": weight_decay,
                   "warmup_ratio": warmup_ratio, "temperature": temperature, "headed": headed,
                   "image_size": config.image_size}
    wrapper, log = run_loop(model, groups, dataset_batches(train_dataset, settings), loss_fn, settings,
                            fingerprint=fingerprint)
    gene = wrapper.gene.cpu().requires_grad_(False)
    head_n = min(10, len(log.losses))
    if eval_dataset is not None and headed:
        folded = auxiliary_model(gene, teacher.num_labels)
        folded.classifier.load_state_dict(wrapper.vit.classifier.state_dict())
        gene.metrics.update(aux_accuracy=round(accuracy(folded, eval_dataset), 5),
                            teacher_accuracy=round(accuracy(teacher, eval_dataset), 5))
    elif eval_dataset is not None:
        wrapper.cpu()
        mapped, _ = predict(_MappedFeature(wrapper), eval_dataset)
        target, _ = predict(teacher.cpu(), eval_dataset)
        gene.metrics["aux_cls_r2"] = round(r2_score(mapped, target), 5)
    gene.metrics.update({
        "teacher_name_or_path": teacher.name_or_path, "teacher_signal": "logits" if headed else "cls feature",
        "image_size": config.image_size, "init": init, "steps": log.steps_done,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "temperature": temperature, "seed": seed,
        "loss_start": round(sum(log.losses[:head_n]) / max(head_n, 1), 5),
        "loss_end": round(sum(log.losses[-head_n:]) / max(head_n, 1), 5),
    })
    return gene


class _MappedFeature(nn.Module):
    """The auxiliary model's mapped CLS feature as ``predict`` reads a headless model (``last_hidden_state``)."""

    def __init__(self, model: _AuxiliaryModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.model(pixel_values)[1][:, None])


def auxiliary_model(gene: Learngene, num_labels: int = 10) -> ViTForImageClassification:
    """The learngene's auxiliary model folded to a stock ViT (new head): what ``train_learngene`` trained."""
    return model_from_encoder(gene.vit_config(num_labels=num_labels), gene.expand(gene.shape.depth), seed=0)


@register_init_method("tleg_learngene", options=("learngene",),
                      description="TLEG (Xia et al. 2024): W_l = A + (l/L) B from a learngene trained under the "
                                  "linear-expansion constraint (train_learngene)")
def tleg_learngene(req: InitRequest) -> ViTForImageClassification:
    """``learngene``: a ``Learngene`` or anything ``Learngene.from_pretrained`` takes; its width is the only one
    it builds (TLEG has no width rule), at its own image size."""
    gene = req.options.get("learngene")
    if gene is None:
        raise ValueError("init method 'tleg_learngene' needs learngene= (a Learngene, a folder or a repo id)")
    if not isinstance(gene, Learngene):
        gene = Learngene.from_pretrained(gene)
    if req.width != gene.width:
        raise ValueError(f"a TLEG learngene builds its own width only: width={req.width}, learngene width "
                         f"{gene.width} (accepted: {gene.width})")
    if req.image_size not in (None, gene.shape.image_size):
        raise ValueError(f"a TLEG learngene builds at its own image size: image_size={req.image_size}, accepted: "
                         f"{gene.shape.image_size}")
    config = gene.vit_config(req.depth, req.num_labels, req.id2label)
    if req.num_heads not in (None, config.num_attention_heads):
        raise ValueError(f"num_heads={req.num_heads}: a learngene keeps its heads ({config.num_attention_heads})")
    with torch.no_grad():
        return model_from_encoder(config, gene.expand(req.depth), req.seed)
