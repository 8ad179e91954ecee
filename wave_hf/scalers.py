"""``Scalers``: everything size-specific that turns shared templates into one (depth, width) ViT.

Depth sets how many per-layer sets there are; width sets their shape (``r = width / template_width``).
Three groups, all small, and an optional fourth:

* ``matrix[type]`` ``(L, N, r, r)``: the Kronecker coefficients of the qkv, o, fc1 and fc2 templates;
* ``vector_scalers[kind]`` ``(L, J, r)`` or ``(J, r)``: coefficients of the vector templates;
* ``vectors[kind]`` ``(L, J, E, A)`` or ``(J, E, A)``: the vector templates themselves (biases, LayerNorms,
  patch/position embeddings, CLS) at template width, resampled to this depth;
* ``lowrank_a[name]`` ``(L, out, k)`` and ``lowrank_b[name]`` ``(L, k, in)``, only when ``lowrank_rank = k > 0``:
  a per-layer low-rank correction ``A_l @ B_l`` added to each built matrix (q, k, v, o, fc1, fc2). The shared
  templates span the same few directions in every layer and every size; the correction gives each size a
  little per-layer freedom they cannot express, and it is still a plain matrix sum, so it folds exactly and
  the output stays a stock ViT. At rank 0 (the default) nothing of it exists: no tensors, no file entries.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import vit_layout
from .configuration_wave import WaveTemplateConfig
from .kronecker import interpolate_depth, random_orthogonal, resize_ratio
from .validation import MAX_DEPTH, MAX_WIDTH, check_choice, check_int, check_memory

MATRIX_TYPES = ("qkv", "o", "fc1", "fc2")
FORMAT = "wave-hf-scalers-v1"

#: How a target of another depth takes the auxiliary model's per-layer scalers (``depth_indices``).
DEPTH_RULES = ("relative", "first", "even")
#: The rule every entry point uses unless told otherwise (``build``, ``scalers_for``, ``FitConfig``,
#: ``wave_default``): changing it here changes it everywhere. Chosen on a validation split
#: (``benchmarks/results/init_ablation.md``, own teacher, 3 seeds): "even" 83.6% and "first" 83.3% mean
#: validation accuracy after fine-tuning, against 77.8% for "relative" (docs/wave.md's resampling by relative
#: depth, which blends middle and late layers); "even" and "first" are within noise of each other.
DEFAULT_DEPTH_RULE = "even"


def check_depth_rule(rule: Any) -> str:
    """``rule`` if it is one of ``DEPTH_RULES``, else ``ValueError`` naming it and the accepted ones."""
    return check_choice("depth_rule", rule, DEPTH_RULES)


def depth_indices(source_depth: int, depth: int, rule: str) -> list[int] | None:
    """The source layer each of ``depth`` target layers copies under ``rule``; None for ``"relative"``,
    which blends neighbouring layers (``interpolate_depth``) instead of copying one.

    * ``"first"``: layers ``0 .. depth - 1``, Weight Selection's depth rule. A shallow target then starts as
      the auxiliary model's own first blocks, whose features the later blocks were trained to read, where a
      relative resample skips or blends blocks. A target deeper than the source takes all of its layers and
      repeats the last one for the extra layers: every layer the source has stays exactly its own, and
      nothing is invented between layers (a repeated block starts as a copy; the fit moves each its own way).
    * ``"even"``: evenly spaced layers, exactly ``baselines.uniform_indices`` for a shallower target (every
      ``k``-th layer from 0 when ``depth`` divides the source depth, else the rounded points of a grid from
      the first to the last layer). A deeper target repeats each source layer ``~depth / source_depth`` times,
      by the same rounded grid. Exact rational arithmetic, so no float rounding decides a pick.
    """
    if check_depth_rule(rule) == "relative":
        return None
    if rule == "first":
        return [min(layer, source_depth - 1) for layer in range(depth)]
    if source_depth % depth == 0:
        return [layer * (source_depth // depth) for layer in range(depth)]
    return [round(Fraction(layer * (source_depth - 1), depth - 1)) for layer in range(depth)]


def resample_depth(per_layer: torch.Tensor, depth: int, rule: str) -> torch.Tensor:
    """A per-layer stack ``(L_src, ...)`` at ``depth`` layers by ``rule`` (``depth_indices``); ``"relative"``
    is ``interpolate_depth``, unchanged bit for bit."""
    picks = depth_indices(per_layer.shape[0], depth, rule)
    if picks is None:
        return interpolate_depth(per_layer, depth)
    return per_layer[torch.tensor(picks)]


@dataclass(frozen=True)
class VectorKind:
    """One width-dependent non-matrix tensor: per layer or global, ``extra`` non-unit entries per unit."""

    per_layer: bool
    extra: int
    unit_multiple: int


def vector_kinds(config: WaveTemplateConfig) -> dict[str, VectorKind]:
    """Every vector tensor a target ViT needs, in a fixed order."""
    kinds: dict[str, VectorKind] = {}
    names = ["q_bias", "k_bias", "v_bias"] if config.qkv_bias else []
    names += ["o_bias", "fc2_bias", "ln1_weight", "ln1_bias", "ln2_weight", "ln2_bias"]
    for name in names:
        kinds[name] = VectorKind(True, 1, 1)
    kinds["fc1_bias"] = VectorKind(True, 1, config.mlp_ratio)
    kinds["patch_weight"] = VectorKind(False, config.num_channels * config.patch_size**2, 1)
    kinds["patch_bias"] = VectorKind(False, 1, 1)
    kinds["cls"] = VectorKind(False, 1, 1)
    kinds["pos"] = VectorKind(False, config.num_tokens, 1)
    kinds["final_ln_weight"] = VectorKind(False, 1, 1)
    kinds["final_ln_bias"] = VectorKind(False, 1, 1)
    return kinds


def _is_gain(name: str) -> bool:
    return name.endswith("ln_weight") or name in ("ln1_weight", "ln2_weight")


def check_target_size(config: WaveTemplateConfig, depth: int, width: int, num_heads: int | None = None
                      ) -> tuple[int, int, int]:
    """Validate a target size against the bank: ``(depth, width, num_heads)`` as plain ints.

    Numpy/torch integers are accepted and converted (a size must end up in a JSON ``config.json``); the
    bounds are ``validation.MAX_DEPTH`` and ``validation.MAX_WIDTH``, checked before anything is allocated.
    """
    depth = check_int("depth", depth, 1, MAX_DEPTH)
    width = check_int("width", width)
    dt = config.template_width
    if width < dt or width % dt:
        raise ValueError(
            f"width={width} must be a positive multiple of the bank's template_width={dt} "
            f"(e.g. {dt}, {2 * dt}, {3 * dt}, ...)"
        )
    check_int("width", width, dt, MAX_WIDTH, hint=" (validation.MAX_WIDTH)")
    if num_heads is None:
        if width % config.head_dim:
            raise ValueError(
                f"width={width} is not a multiple of head_dim={config.head_dim}; pass num_heads dividing {width}"
            )
        return depth, width, width // config.head_dim
    num_heads = check_int("num_heads", num_heads, 1, width)
    if width % num_heads:
        divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
        raise ValueError(f"num_heads={num_heads} does not divide width={width}; accepted: {divisors}")
    return depth, width, num_heads


def check_size(config: WaveTemplateConfig, depth: int, width: int, num_heads: int | None = None) -> int:
    """Validate a target size against the bank and return its head count (see ``check_target_size``)."""
    return check_target_size(config, depth, width, num_heads)[2]


def check_lowrank_rank(rank: int, width: int) -> int:
    """Validate a low-rank correction rank for a target of this width: an int in ``[0, width]``.

    ``width`` is ``min(out, in)`` of the target's smallest matrices (q, k, v, o are ``width x width``).
    """
    try:
        return check_int("lowrank_rank", rank, 0, width)
    except (TypeError, ValueError):
        raise ValueError(
            f"lowrank_rank must be an int in [0, {width}] (0 is off; {width} = min(out, in) of the smallest "
            f"matrix at width {width}), got {rank!r}"
        ) from None


def matrix_shapes(config: WaveTemplateConfig, width: int) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each per-layer matrix of a target of this width, by its short name (q, k, ... fc2)."""
    hidden = config.mlp_ratio * width
    shapes = {"fc1": (hidden, width), "fc2": (width, hidden)}
    return {name: shapes.get(name, (width, width)) for name in vit_layout.LAYER_MATRICES}


class Scalers(nn.Module):
    """The size-specific parameters of one target; see the module docstring for the groups.

    ``lowrank_rank`` (default 0: off) adds the per-layer low-rank correction factors, created as zeros
    here; ``from_source`` and ``with_lowrank`` start them so that the correction is exactly zero.
    """

    def __init__(self, config: WaveTemplateConfig, depth: int, width: int, num_heads: int | None = None,
                 lowrank_rank: int = 0):
        super().__init__()
        depth, width, self.num_heads = check_target_size(config, depth, width, num_heads)
        self.lowrank_rank = check_lowrank_rank(lowrank_rank, width)
        self.fit_config: dict | None = None  # set by wave_hf.fit: how these scalers were fitted
        check_memory(4 * self.num_elements(config, depth, width, self.lowrank_rank),
                     f"scalers for depth={depth}, width={width}")
        self.depth, self.width = depth, width
        self.ratio = width // config.template_width
        self.template_width = config.template_width
        n, j, r, a = config.num_templates, config.num_vector_templates, self.ratio, config.template_width
        self.matrix = nn.ParameterDict({t: nn.Parameter(torch.zeros(depth, n, r, r)) for t in MATRIX_TYPES})
        self.vector_scalers = nn.ParameterDict()
        self.vectors = nn.ParameterDict()
        for name, kind in vector_kinds(config).items():
            lead = (depth,) if kind.per_layer else ()
            self.vector_scalers[name] = nn.Parameter(torch.zeros(*lead, j, r))
            self.vectors[name] = nn.Parameter(torch.zeros(*lead, j, kind.extra, a * kind.unit_multiple))
        self.lowrank_a = nn.ParameterDict()  # empty at rank 0
        self.lowrank_b = nn.ParameterDict()
        if lowrank_rank:
            for name, (rows, cols) in matrix_shapes(config, width).items():
                self.lowrank_a[name] = nn.Parameter(torch.zeros(depth, rows, lowrank_rank))
                self.lowrank_b[name] = nn.Parameter(torch.zeros(depth, lowrank_rank, cols))

    @staticmethod
    def num_elements(config: WaveTemplateConfig, depth: int, width: int, lowrank_rank: int = 0) -> int:
        """Entries of the scalers of this size, computed without allocating them (for ``check_memory``)."""
        n, j, a = config.num_templates, config.num_vector_templates, config.template_width
        r = width // a
        total = len(MATRIX_TYPES) * depth * n * r * r
        for kind in vector_kinds(config).values():
            lead = depth if kind.per_layer else 1
            total += lead * j * (r + kind.extra * a * kind.unit_multiple)
        total += sum(depth * lowrank_rank * (rows + cols) for rows, cols in matrix_shapes(config, width).values())
        return total

    def extra_repr(self) -> str:
        text = f"depth={self.depth}, width={self.width}, num_heads={self.num_heads}, r={self.ratio}"
        return f"{text}, lowrank_rank={self.lowrank_rank}" if self.lowrank_rank else text

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_random(self, config: WaveTemplateConfig, generator: torch.Generator | None = None) -> Scalers:
        """Stage-1 start from scratch: orthogonal, distinct per template (docs/wave.md section 8.1).

        ``sqrt(r/N) Q`` keeps the built weights' std equal to the templates'; a distinct ``Q`` per
        template and per-layer noise keep sibling units from being copies. LayerNorm gains start at 1
        exactly (templates solve ``t^T s = 1``), biases at 0.
        """
        r, n, j = self.ratio, config.num_templates, config.num_vector_templates
        for t in MATRIX_TYPES:
            q = torch.stack([random_orthogonal(r, r, generator) for _ in range(n)])
            noise = torch.randn(self.depth, n, r, r, generator=generator)
            self.matrix[t].copy_((r / n) ** 0.5 * q + 0.1 * noise)
        for name, s in self.vector_scalers.items():
            q = random_orthogonal(j, r, generator)
            s.copy_((r / j) ** 0.5 * q + 0.1 * torch.randn(s.shape, generator=generator))
            vec = self.vectors[name]
            if _is_gain(name):
                # Built gain = sum_j t_j s_j[p] = 1 for every p: t = 1^T pinv(s), per layer.
                coeff = torch.ones(*s.shape[:-2], 1, r) @ torch.linalg.pinv(s)
                vec.copy_(coeff.transpose(-1, -2).unsqueeze(-1).expand_as(vec))
            elif name in ("patch_weight", "pos", "cls"):
                vec.copy_(nn.init.trunc_normal_(torch.empty(vec.shape), std=0.02, generator=generator))
            else:
                vec.zero_()
        return self

    @torch.no_grad()
    def _start_lowrank(self, generator: torch.Generator | None) -> None:
        """LoRA's start for new factors: ``A`` keeps the zeros ``__init__`` made, and
        ``B ~ U(-1/sqrt(in), 1/sqrt(in))`` (LoRA's kaiming-uniform with ``a = sqrt(5)``).

        The correction ``A @ B`` is then exactly zero, so the built weights are unchanged, while ``A`` still
        gets a gradient through the random ``B``.
        """
        for b in self.lowrank_b.values():
            bound = b.shape[-1] ** -0.5
            b.uniform_(-bound, bound, generator=generator)

    def with_lowrank(self, config: WaveTemplateConfig, rank: int,
                     generator: torch.Generator | None = None) -> Scalers:
        """These scalers with a rank-``rank`` low-rank correction that starts at exactly zero.

        Returns ``self`` when ``rank`` is 0 or the correction they carry already has that rank (fitted factors
        are kept), else a copy with new factors drawn from ``generator``. Replacing a correction of another
        non-zero rank would silently change the weights, so that raises.
        """
        rank = check_lowrank_rank(rank, self.width)
        if rank in (0, self.lowrank_rank):
            return self
        if self.lowrank_rank:
            raise ValueError(
                f"these scalers carry a rank-{self.lowrank_rank} low-rank correction; lowrank_rank={rank} would "
                f"replace it (accepted: 0 or {self.lowrank_rank})"
            )
        out = Scalers(config, self.depth, self.width, self.num_heads, rank)
        out.load_state_dict({**out.state_dict(), **self.state_dict()})
        out._start_lowrank(generator)
        return out

    @classmethod
    @torch.no_grad()
    def from_source(
        cls,
        config: WaveTemplateConfig,
        source: Scalers,
        depth: int,
        width: int,
        num_heads: int | None = None,
        seed: int = 0,
        lowrank_rank: int = 0,
        depth_rule: str = DEFAULT_DEPTH_RULE,
    ) -> Scalers:
        """Default init for a new size: resample ``source`` (e.g. the auxiliary scalers) to ``depth`` by
        ``depth_rule`` (``DEPTH_RULES``, see ``depth_indices``; ``"relative"`` is docs/wave.md section 5 item 6),
        then crop or pad the ratio (with the section 8 fix).

        With ``lowrank_rank > 0`` the correction factors start at a zero product (``_start_lowrank``), drawn
        after the padding from the same seeded generator; rank 0 draws nothing, so the bits are unchanged.
        The rule picks layers only: the generator draws the same numbers under every rule.
        """
        depth_rule = check_depth_rule(depth_rule)
        out = cls(config, depth, width, num_heads, lowrank_rank)
        gen = torch.Generator().manual_seed(seed)
        for t in MATRIX_TYPES:
            out.matrix[t].copy_(resize_ratio(resample_depth(source.matrix[t], depth, depth_rule), out.ratio, 2, gen))
        for name, kind in vector_kinds(config).items():
            s, v = source.vector_scalers[name], source.vectors[name]
            if kind.per_layer:
                s, v = resample_depth(s, depth, depth_rule), resample_depth(v, depth, depth_rule)
            out.vector_scalers[name].copy_(resize_ratio(s, out.ratio, 1, gen))
            out.vectors[name].copy_(v)
        out._start_lowrank(gen)
        return out

    # ------------------------------------------------------------------------------------------ I/O
    def check_compatible(self, config: WaveTemplateConfig) -> None:
        """Raise ``ValueError`` unless every tensor has the shape ``config`` gives scalers of this size: scalers
        of another bank (other template width or count) would fail deep inside the assembly otherwise."""
        with torch.device("meta"):
            ref = Scalers(config, self.depth, self.width, self.num_heads, self.lowrank_rank)
        mine = self.state_dict()
        for key, value in ref.state_dict().items():
            if key not in mine or mine[key].shape != value.shape:
                got = tuple(mine[key].shape) if key in mine else "nothing"
                raise ValueError(f"scalers tensor {key} has shape {got}; this bank needs {tuple(value.shape)} "
                                 f"(scalers of another bank?)")

    def check_finite(self, what: str = "scalers") -> None:
        """Raise ``ValueError`` naming the first tensor that holds NaN or Inf: such scalers build NaN weights."""
        for key, value in self.state_dict().items():
            if not torch.isfinite(value).all():
                raise ValueError(f"{what}: tensor {key} contains NaN or Inf")

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomically), with the size (and any low-rank rank) in its metadata.

        Non-finite scalers are refused: the file would load only to build NaN weights.
        """
        self.check_finite(f"scalers for depth={self.depth}, width={self.width}")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "depth": str(self.depth), "width": str(self.width),
                "num_heads": str(self.num_heads), "template_width": str(self.template_width)}
        if self.lowrank_rank:  # rank 0 writes exactly the files written before the correction existed
            meta["lowrank_rank"] = str(self.lowrank_rank)
        if self.fit_config:  # the FitConfig that made them, so a bank says how each size was fitted
            meta["fit_config"] = json.dumps(self.fit_config, sort_keys=True)
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @staticmethod
    def read_metadata(path: str, meta: dict[str, str], config: WaveTemplateConfig) -> tuple[int, int, int, int]:
        """``(depth, width, num_heads, lowrank_rank)`` from a scalers file's metadata, validated against the
        bank and the limits before any tensor is read: the metadata is untrusted (a file saying width 2**20
        would otherwise allocate terabytes)."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a wave-hf scalers file (format={meta.get('format')!r})")
        values = {}
        for key in ("depth", "width", "num_heads", "template_width", "lowrank_rank"):
            raw = meta.get(key, "0" if key == "lowrank_rank" else None)
            if raw is None:
                raise ValueError(f"{path}: the metadata has no {key!r} (a file written by Scalers.save has it)")
            if not (raw.isascii() and raw.isdecimal() and len(raw) <= 9):
                raise ValueError(f"{path}: metadata {key}={raw!r} is not a decimal integer")
            values[key] = int(raw)
        if values["template_width"] != config.template_width:
            raise ValueError(f"{path}: metadata template_width={values['template_width']}, but the bank's "
                             f"template_width is {config.template_width}")
        try:
            depth, width, heads = check_target_size(config, values["depth"], values["width"], values["num_heads"])
            rank = check_lowrank_rank(values["lowrank_rank"], width)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: the metadata describes scalers this bank cannot use: {err}") from None
        return depth, width, heads, rank

    @classmethod
    def load(cls, path: str | os.PathLike, config: WaveTemplateConfig) -> Scalers:
        """Read a file written by ``save`` and check every tensor against the bank's config.

        The metadata is validated first, then every tensor's shape from the header, and only then are the
        tensors read. A file without ``lowrank_rank`` metadata (written before the correction existed) has
        rank 0.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no scalers file at {path}")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise OSError(f"{path} is not a readable safetensors file ({err})") from err
        out = cls(config, *cls.read_metadata(path, meta, config))
        expected = {key: tuple(value.shape) for key, value in out.state_dict().items()}
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        if missing or extra:
            raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {extra}")
        for key, shape in shapes.items():
            if shape != expected[key]:
                raise ValueError(f"{path}: tensor {key} has shape {shape}, expected {expected[key]}")
        try:
            tensors = load_file(path)
        except Exception as err:
            raise OSError(f"{path} is not a readable safetensors file ({err})") from err
        out.load_state_dict(tensors)
        out.check_finite(path)
        out.fit_config = _read_fit_config(path, meta.get("fit_config"))
        return out

    @staticmethod
    def filename(depth: int, width: int, num_heads: int) -> str:
        return f"scalers/depth{depth}-width{width}-heads{num_heads}.safetensors"


def _read_fit_config(path: str, raw: str | None) -> dict | None:
    """The stored ``FitConfig`` as a plain dict (untrusted: a JSON object of names to scalars, or nothing)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw) if len(raw) <= 65536 else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in value.items()):
        raise ValueError(f"{path}: metadata fit_config is not a JSON object of option names to values")
    return value
