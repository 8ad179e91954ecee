"""``Scalers``: everything size-specific that turns shared templates into one (depth, width) ViT.

Depth sets how many per-layer sets there are; width sets their shape (``r = width / template_width``).
Three groups, all small:

* ``matrix[type]`` ``(L, N, r, r)``: the Kronecker coefficients of the qkv, o, fc1 and fc2 templates;
* ``vector_scalers[kind]`` ``(L, J, r)`` or ``(J, r)``: coefficients of the vector templates;
* ``vectors[kind]`` ``(L, J, E, A)`` or ``(J, E, A)``: the vector templates themselves (biases, LayerNorms,
  patch/position embeddings, CLS) at template width, resampled to this depth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .configuration_wave import WaveTemplateConfig
from .kronecker import interpolate_depth, random_orthogonal, resize_ratio

MATRIX_TYPES = ("qkv", "o", "fc1", "fc2")
FORMAT = "wave-hf-scalers-v1"


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


def check_size(config: WaveTemplateConfig, depth: int, width: int, num_heads: int | None = None) -> int:
    """Validate a target size against the bank and return its head count."""
    for name, value in (("depth", depth), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if depth < 1 or depth > 1024:
        raise ValueError(f"depth must be in [1, 1024], got {depth}")
    dt = config.template_width
    if width < dt or width % dt:
        raise ValueError(
            f"width={width} must be a positive multiple of the bank's template_width={dt} "
            f"(e.g. {dt}, {2 * dt}, {3 * dt}, ...)"
        )
    if num_heads is None:
        if width % config.head_dim:
            raise ValueError(
                f"width={width} is not a multiple of head_dim={config.head_dim}; pass num_heads dividing {width}"
            )
        return width // config.head_dim
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if width % num_heads:
        divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
        raise ValueError(f"num_heads={num_heads} does not divide width={width}; accepted: {divisors}")
    return num_heads


class Scalers(nn.Module):
    """The size-specific parameters of one target; see the module docstring for the three groups."""

    def __init__(self, config: WaveTemplateConfig, depth: int, width: int, num_heads: int | None = None):
        super().__init__()
        self.num_heads = check_size(config, depth, width, num_heads)
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

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, num_heads={self.num_heads}, r={self.ratio}"

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
    ) -> Scalers:
        """Default init for a new size: resample ``source`` (e.g. the auxiliary scalers) by relative depth,
        then crop or pad the ratio (docs/wave.md section 5 item 6, with the section 8 fix)."""
        out = cls(config, depth, width, num_heads)
        gen = torch.Generator().manual_seed(seed)
        for t in MATRIX_TYPES:
            out.matrix[t].copy_(resize_ratio(interpolate_depth(source.matrix[t], depth), out.ratio, 2, gen))
        for name, kind in vector_kinds(config).items():
            s, v = source.vector_scalers[name], source.vectors[name]
            if kind.per_layer:
                s, v = interpolate_depth(s, depth), interpolate_depth(v, depth)
            out.vector_scalers[name].copy_(resize_ratio(s, out.ratio, 1, gen))
            out.vectors[name].copy_(v)
        return out

    # ------------------------------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomically), with the size in its metadata."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "depth": str(self.depth), "width": str(self.width),
                "num_heads": str(self.num_heads), "template_width": str(self.template_width)}
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, config: WaveTemplateConfig) -> Scalers:
        """Read a file written by ``save`` and check every tensor against the bank's config."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no scalers file at {path}")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(path)
        except Exception as err:
            raise OSError(f"{path} is not a readable safetensors file ({err})") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a wave-hf scalers file (format={meta.get('format')!r})")
        out = cls(config, int(meta["depth"]), int(meta["width"]), int(meta["num_heads"]))
        expected = out.state_dict()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {extra}")
        for key, value in tensors.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"{path}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"{path}: tensor {key} contains NaN or Inf")
        out.load_state_dict(tensors)
        return out

    @staticmethod
    def filename(depth: int, width: int, num_heads: int) -> str:
        return f"scalers/depth{depth}-width{width}-heads{num_heads}.safetensors"

