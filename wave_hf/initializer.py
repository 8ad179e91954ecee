"""``WaveInitializer``: the call users write, ``WaveInitializer.from_pretrained(repo).build(depth=..., width=...)``."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import ViTConfig, ViTForImageClassification

from . import vit_layout
from .configuration_wave import WaveTemplateConfig
from .fold import head_init_, parametrize_vit
from .io import HubMixin, require_finite
from .rule import assemble
from .scalers import DEFAULT_DEPTH_RULE, Scalers, check_depth_rule, check_target_size
from .templates import TemplateBank
from .validation import MAX_IMAGE_SIZE, MAX_SEED, check_int, check_name

DEFAULT_BANK = Path(__file__).resolve().parent / "default_bank"
DEFAULT_NAMES = ("default", "wave-hf/default")
SCALERS_GLOB = "scalers/*.safetensors"
BANK_FILES = ["config.json", "model.safetensors", "README.md", SCALERS_GLOB]


def _check_bank_folder(folder: Path, name: str) -> None:
    for required in ("config.json", "model.safetensors"):
        path = folder / required
        if not path.is_file():
            raise FileNotFoundError(f"{name!r} has no {required} (looked in {folder})")
        if path.stat().st_size == 0:
            raise OSError(f"{path} is empty (zero bytes): the bank was not written completely")
    weights = folder / "model.safetensors"
    try:
        with safe_open(weights, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable; touching every tensor catches truncation
                f.get_slice(key).get_shape()
    except Exception as err:
        raise OSError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from err


class WaveInitializer(HubMixin, library_name="wave-hf", tags=["wave-hf", "wave", "weight-templates", "vit"],
                      repo_url="https://arxiv.org/abs/2406.17503"):
    """A template bank plus the scalers fitted for particular sizes; builds stock ViTs of any size.

    Args:
        bank: the ``TemplateBank`` to assemble from.
        scalers: fitted ``Scalers``, keyed by ``(depth, width, num_heads)``; ``build`` uses them when the
            size matches and otherwise starts from the auxiliary scalers (resampled by depth and width).
    """

    def __init__(self, bank: TemplateBank, scalers: dict[tuple[int, int, int], Scalers] | None = None):
        if not isinstance(bank, TemplateBank):
            raise TypeError(f"bank must be a TemplateBank, got {type(bank).__name__}")
        self.bank = bank
        self.config: WaveTemplateConfig = bank.config
        self.fitted: dict[tuple[int, int, int], Scalers] = {}
        if scalers is not None and not isinstance(scalers, dict):
            raise TypeError(f"scalers must be a dict {{(depth, width, num_heads): Scalers}}, got "
                            f"{type(scalers).__name__}")
        for key, value in (scalers or {}).items():
            if not isinstance(value, Scalers):
                raise TypeError(f"scalers[{key!r}] must be a Scalers, got {type(value).__name__}")
            size = (value.depth, value.width, value.num_heads)
            if key != size:
                raise ValueError(f"scalers[{key!r}] holds scalers for (depth, width, num_heads)={size}")
            self.add_scalers(value)

    def __repr__(self) -> str:
        c = self.config
        sizes = ", ".join(f"{d}x{w}" for d, w, _ in sorted(self.fitted)) or "none"
        return (
            f"WaveInitializer(template_width={c.template_width}, num_templates={c.num_templates}, "
            f"aux={c.aux_depth}x{c.aux_width}, teacher={c.teacher_name_or_path!r}, fitted sizes: {sizes})"
        )

    # ------------------------------------------------------------------------------------- loading
    owned_files = (SCALERS_GLOB,)
    download_patterns = tuple(BANK_FILES)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike = "default", **kwargs: Any
                        ) -> WaveInitializer:
        """Load a bank from a folder, a Hub repo id (``revision``, ``cache_dir``, ``local_files_only``,
        ``token``; offline mode from the cache) or ``"default"``, the bank shipped inside the package."""
        if os.fspath(pretrained_model_name_or_path) in DEFAULT_NAMES:
            if not (DEFAULT_BANK / "model.safetensors").is_file():
                raise FileNotFoundError(
                    f"the embedded default bank is missing from {DEFAULT_BANK}; reinstall wave-hf or pass a bank path"
                )
            return cls._from_folder(DEFAULT_BANK, os.fspath(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_folder(cls, folder: Path, name: str, **kwargs: Any) -> WaveInitializer:
        if kwargs:
            raise TypeError(f"from_pretrained got unknown arguments {sorted(kwargs)}")
        _check_bank_folder(folder, name)
        # config.json first, so that a wrong model_type fails with our message, not a shape mismatch.
        config = WaveTemplateConfig.from_pretrained(folder)
        try:
            bank, info = TemplateBank.from_pretrained(folder, config=config, output_loading_info=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise OSError(f"could not read the template bank in {folder}: {err}") from err
        bad = info["missing_keys"] or info["unexpected_keys"] or info.get("mismatched_keys")
        if bad:
            raise ValueError(
                f"template bank {name!r} does not match its config.json: missing {sorted(info['missing_keys'])}, "
                f"unexpected {sorted(info['unexpected_keys'])}, mismatched {info.get('mismatched_keys')}"
            )
        bank.check_finite()
        bank.requires_grad_(False)
        scalers: dict[tuple[int, int, int], Scalers] = {}
        for path in sorted((folder / "scalers").glob("*.safetensors")):
            if path.name.startswith("."):  # hidden files (macOS "._*" copies, editors) are not scalers
                continue
            check_name(path.name, "scalers file name")  # the folder is untrusted: no reserved/odd names
            s = Scalers.load(path, config)
            size = (s.depth, s.width, s.num_heads)
            expected = Path(Scalers.filename(*size)).name
            if path.name != expected:
                raise ValueError(f"{path}: its metadata says depth={s.depth}, width={s.width}, heads={s.num_heads}, "
                                 f"so its name must be {expected!r}: the bank folder was edited by hand")
            scalers[size] = s
        return cls(bank, scalers)

    # ---------------------------------------------------------------------------------- assembling
    def config_at(self, image_size: int | None = None) -> WaveTemplateConfig:
        """The bank's config at another input size (a multiple of its patch size; ``None``: its own).

        The bank records the size it was distilled at (``config.image_size``); a target at another size gets
        its position embeddings resampled from that grid (``rule``), exactly as the teacher family resamples
        its own, and everything else unchanged."""
        c = self.config
        if image_size is None or image_size == c.image_size:
            return c
        image_size = check_int("image_size", image_size, 1, MAX_IMAGE_SIZE)
        if image_size % c.patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of the bank's patch_size={c.patch_size} "
                             f"(e.g. {max(c.patch_size, image_size // c.patch_size * c.patch_size)})")
        out = copy.deepcopy(c)
        out.image_size = image_size
        out.check()
        return out

    def vit_config(self, depth: int, width: int, num_heads: int | None = None, num_labels: int = 10,
                   id2label: dict[int, str] | None = None, image_size: int | None = None) -> ViTConfig:
        """The stock ``ViTConfig`` of a target size (validated against the bank; ``id2label``, if given,
        sets the labels and must map ``0 .. n - 1`` to strings; ``image_size`` defaults to the bank's)."""
        depth, width, heads = check_target_size(self.config, depth, width, num_heads)
        c = self.config_at(image_size)
        shape = vit_layout.ViTShape(depth, width, heads, c.mlp_ratio, c.image_size, c.patch_size, c.num_channels)
        return vit_layout.make_vit_config(
            shape, layer_norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias, hidden_act=c.hidden_act,
            num_labels=num_labels, id2label=id2label,
        )

    def scalers_for(self, depth: int, width: int, num_heads: int | None = None, seed: int = 0,
                    lowrank_rank: int = 0, depth_rule: str = DEFAULT_DEPTH_RULE) -> Scalers:
        """Fitted scalers for this size if the bank has them, else the default init from the auxiliary ones.

        ``depth_rule`` (``scalers.DEPTH_RULES``) is how the default init takes the auxiliary layers when the
        depths differ (``Scalers.from_source``); it is checked always but does not touch fitted scalers.
        ``lowrank_rank > 0`` gives scalers that have no low-rank correction one of that rank, starting at
        exactly zero (``Scalers.with_lowrank``, seeded by ``seed``); fitted scalers that carry one keep it.
        """
        depth_rule = check_depth_rule(depth_rule)
        depth, width, heads = check_target_size(self.config, depth, width, num_heads)
        seed = check_int("seed", seed, 0, MAX_SEED)
        fitted = self.fitted.get((depth, width, heads))
        if fitted is not None:
            return fitted.with_lowrank(self.config, lowrank_rank, torch.Generator().manual_seed(seed))
        return Scalers.from_source(self.config, self.bank.aux, depth, width, heads, seed=seed,
                                   lowrank_rank=lowrank_rank, depth_rule=depth_rule)

    def _resolve_scalers(self, depth: int, width: int, num_heads: int | None, scalers: Scalers | None,
                         seed: int, lowrank_rank: int, depth_rule: str) -> Scalers:
        if scalers is None:
            return self.scalers_for(depth, width, num_heads, seed, lowrank_rank, depth_rule)
        if not isinstance(scalers, Scalers):
            raise TypeError(f"scalers must be a Scalers, got {type(scalers).__name__}")
        depth, width, heads = check_target_size(self.config, depth, width, num_heads)
        seed = check_int("seed", seed, 0, MAX_SEED)
        scalers.check_compatible(self.config)
        if (scalers.depth, scalers.width, scalers.num_heads) != (depth, width, heads):
            raise ValueError(
                f"scalers are for depth={scalers.depth}, width={scalers.width}, heads={scalers.num_heads}; "
                f"asked for depth={depth}, width={width}, heads={heads}"
            )
        return scalers.with_lowrank(self.config, lowrank_rank, torch.Generator().manual_seed(seed))

    def _target(self, depth: int, width: int, num_heads: int | None = None, num_labels: int = 10,
                id2label: dict[int, str] | None = None, scalers: Scalers | None = None, seed: int = 0,
                lowrank_rank: int = 0, image_size: int | None = None, depth_rule: str = DEFAULT_DEPTH_RULE):
        """Validated ``ViTConfig`` and scalers of a target (shared by ``build`` and ``parametrize``): a model
        that would not fit in memory is refused before anything is allocated, and NaN/Inf scalers or
        templates (a diverged fit, a bank edited in memory) are named instead of building NaN weights."""
        depth_rule = check_depth_rule(depth_rule)
        seed = check_int("seed", seed, 0, MAX_SEED)
        vit_config = self.vit_config(depth, width, num_heads, num_labels, id2label, image_size)
        vit_layout.check_buildable(vit_layout.shape_of(vit_config), vit_config.num_labels)
        scalers = self._resolve_scalers(depth, width, num_heads, scalers, seed, lowrank_rank, depth_rule)
        scalers.check_finite(f"scalers for depth={scalers.depth}, width={scalers.width}")
        self.bank.check_finite()
        return vit_config, scalers, seed

    def _may_overflow(self, scalers: Scalers) -> bool:
        """Whether a built entry could leave float32's range, from a bound on the (finite) factors.

        Every entry is a sum of at most ``max(N, J)`` products of a template and a scaler, plus ``k`` products
        of low-rank factors, so ``max(N, J) * max|T| * max|S| + k * max|S|^2`` bounds it: scanning the built
        weights (two passes over every byte) is needed only when that bound is near the limit.
        """
        t = max(float(v.abs().max()) for v in self.bank.templates.values())
        s = max(float(p.abs().max()) for p in scalers.parameters())
        terms = max(self.config.num_templates, self.config.num_vector_templates)
        return terms * max(t, s) * s + scalers.lowrank_rank * s * s > 1e30

    @torch.no_grad()
    def build(
        self,
        depth: int,
        width: int,
        num_heads: int | None = None,
        num_labels: int = 10,
        id2label: dict[int, str] | None = None,
        scalers: Scalers | None = None,
        seed: int = 0,
        lowrank_rank: int = 0,
        image_size: int | None = None,
        depth_rule: str = DEFAULT_DEPTH_RULE,
    ) -> ViTForImageClassification:
        """A stock ``ViTForImageClassification`` with WAVE weights and a new classifier head.

        Built on the meta device and filled with ``load_state_dict(assign=True)``: nothing is randomly
        initialized and then overwritten. ``seed`` fixes the head and any new scaler entries.

        Scalers that carry a low-rank correction (fitted with ``lowrank_rank``) add it to every matrix.
        ``lowrank_rank`` (int in ``[0, width]``, default 0) gives scalers without one a new correction; it starts
        at exactly zero, so here it changes no weight (it matters for ``parametrize``, where it trains).

        ``image_size`` (default: the size the bank was distilled at, ``config.image_size``) builds for another
        input size, a multiple of the patch size: the position embeddings are resampled from the bank's grid
        as the teacher family resamples its own (``config_at``).

        ``depth_rule`` (``"relative"``, ``"first"`` or ``"even"``; default ``scalers.DEFAULT_DEPTH_RULE``) is how
        a size without fitted scalers takes the auxiliary model's layers when its depth differs
        (``scalers.depth_indices``): ``"first"`` starts a shallow target as the auxiliary model's first blocks.
        It has no effect with ``scalers=`` or fitted scalers for this size.
        """
        vit_config, scalers, seed = self._target(depth, width, num_heads, num_labels, id2label, scalers, seed,
                                                 lowrank_rank, image_size, depth_rule)
        state = assemble(self.config_at(image_size), self.bank.templates, scalers)
        for key, value in state.items() if self._may_overflow(scalers) else ():  # finite factors can overflow
            if not torch.isfinite(value).all():
                raise ValueError(f"the built weight {key} overflows to Inf or NaN: the scalers are too large "
                                 f"(max |value| {max(v.abs().max().item() for v in scalers.parameters()):.3g})")
        model = vit_layout.empty_classifier(vit_config)
        head_init_(model, seed)
        state.update({k: v.detach() for k, v in model.classifier.state_dict(prefix="classifier.").items()})
        model.load_state_dict(state, strict=True, assign=True)
        model.eval()
        return model

    def parametrize(self, depth: int, width: int, num_heads: int | None = None, **kwargs: Any
                    ) -> ViTForImageClassification:
        """The same model as ``build`` (same arguments), with its encoder computed from frozen templates and
        trainable scalers. Train it (only the scalers and the head have gradients), then ``wave_hf.fold(model)``.

        With ``lowrank_rank=k`` the scalers also hold rank-``k`` factors ``A_l, B_l`` per layer and matrix, whose
        product is added to the built matrix and starts at zero; ``fold`` bakes it into the plain weights.
        """
        vit_config, scalers, seed = self._target(depth, width, num_heads, **kwargs)
        trainable = Scalers(self.config, depth, width, scalers.num_heads, scalers.lowrank_rank)
        trainable.load_state_dict(scalers.state_dict())
        return parametrize_vit(self.config_at(vit_config.image_size), self.bank.templates, trainable, vit_config,
                               seed=seed)

    def fit_scalers(self, depth: int, width: int, train_dataset: Any, config: Any = None, **kwargs: Any) -> Scalers:
        """Fit new scalers for one size on a little data, templates frozen (stage 2; see ``wave_hf.fit``).

        ``config`` is a ``wave_hf.fit.FitConfig`` (its fields may also be given as keywords). The result is
        also kept with the bank (``add_scalers``), so ``build`` and ``save_pretrained`` use it.
        """
        from .fit import fit_scalers

        scalers = fit_scalers(self, depth, width, train_dataset, config, **kwargs)
        self.add_scalers(scalers)
        return scalers

    # -------------------------------------------------------------------------------------- saving
    def add_scalers(self, scalers: Scalers) -> None:
        """Keep fitted scalers with the bank: ``build`` uses them and ``save_pretrained`` writes them."""
        if not isinstance(scalers, Scalers):
            raise TypeError(f"scalers must be a Scalers, got {type(scalers).__name__}")
        scalers.check_compatible(self.config)
        self.fitted[(scalers.depth, scalers.width, scalers.num_heads)] = scalers

    def _save_pretrained(self, save_directory: Path) -> None:
        """The bank (config, weights, card) with every fitted set under ``scalers/``.

        ``save_pretrained`` publishes it: scalers files of sizes this initializer no longer holds are removed,
        every other file in the folder (``.git``, notes, other models) is left alone.
        """
        for s in self.fitted.values():
            require_finite(s.state_dict().items(), f"scalers {s.depth}x{s.width}")
        self.bank.save_pretrained(save_directory)
        if self.fitted:
            (save_directory / "scalers").mkdir()
        for s in self.fitted.values():
            s.save(save_directory / Scalers.filename(s.depth, s.width, s.num_heads))
