"""``TemplateBank``: the shared, size-agnostic weight templates and the auxiliary model's scalers."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from . import cards
from .configuration_wave import WaveTemplateConfig
from .io import publish_dir, push_folder, require_finite
from .rule import assemble
from .scalers import MATRIX_TYPES, Scalers
from .validation import check_memory


def template_shapes(config: WaveTemplateConfig) -> dict[str, tuple[int, int, int]]:
    """Full-layer templates at width ``D_T`` (docs/wave.md section 2): the scalers are then ``r x r``."""
    n, a, m = config.num_templates, config.template_width, config.mlp_ratio
    return {"qkv": (n, 3 * a, a), "o": (n, a, a), "fc1": (n, m * a, a), "fc2": (n, a, m * a)}


class TemplateBank(PreTrainedModel):
    """Matrix templates shared by every layer and every size, plus the auxiliary model's ``Scalers``.

    ``TemplateBank(config)`` is a random bank (stage-1 start from scratch). ``save_pretrained`` writes
    ``config.json``, ``model.safetensors`` and a model card; ``from_pretrained`` takes a folder or a repo id.
    """

    config_class = WaveTemplateConfig
    base_model_prefix = "bank"
    main_input_name = "pixel_values"
    _no_split_modules: list[str] = []

    def __init__(self, config: WaveTemplateConfig):
        if not isinstance(config, WaveTemplateConfig):
            raise TypeError(f"config must be a WaveTemplateConfig, got {type(config).__name__}")
        templates = sum(math.prod(shape) for shape in template_shapes(config).values())
        aux = Scalers.num_elements(config, config.aux_depth, config.aux_width)
        check_memory(4 * (templates + aux), f"a template bank of {config.num_templates} templates at "
                                            f"template_width={config.template_width}")
        super().__init__(config)
        self.templates = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(shape)) for t, shape in template_shapes(config).items()}
        )
        self.aux = Scalers(config, config.aux_depth, config.aux_width)
        if self.templates["qkv"].device.type != "meta":  # from_pretrained builds on meta, then loads
            self.reset_random()
        self.post_init()

    @torch.no_grad()
    def reset_random(self, generator: torch.Generator | None = None) -> None:
        """Stage-1 start from scratch: trunc-normal templates (std 0.02), orthogonal auxiliary scalers."""
        for p in self.templates.values():
            nn.init.trunc_normal_(p, std=0.02, generator=generator)
        self.aux.reset_random(self.config, generator)

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: ``__init__`` initializes, and ``from_pretrained`` rejects missing tensors."""

    def forward(self, scalers: Scalers | None = None) -> dict[str, Tensor]:
        """The encoder tensors of the model that ``scalers`` describe (the auxiliary model by default)."""
        return assemble(self.config, self.templates, self.aux if scalers is None else scalers)

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the first tensor that holds NaN or Inf: such a bank builds NaN weights,
        so it is refused at load and before saving."""
        for name, tensor in self.state_dict().items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"template bank tensor {name!r} contains NaN or Inf")

    @property
    def num_template_parameters(self) -> int:
        return sum(self.templates[t].numel() for t in MATRIX_TYPES)

    # --------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """transformers' save plus a generated model card; other files in the folder are left alone."""
        kwargs.pop("push_to_hub", None)
        require_finite(self.state_dict().items(), "the template bank")
        with publish_dir(save_directory) as tmp:
            super().save_pretrained(tmp, **kwargs)
            cards.bank_card(self).save(tmp / "README.md")

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload WAVE template bank",
                    private: bool | None = None, token: str | None = None, branch: str | None = None,
                    create_pr: bool = False, delete_patterns: list[str] | str | None = None, **kwargs: Any):
        """Upload ``save_pretrained``'s folder, card included, in one commit (as ``ModelHubMixin`` does)."""
        branch = kwargs.pop("revision", branch)  # transformers' name for the branch
        if kwargs:
            raise TypeError(f"push_to_hub got unknown arguments {sorted(kwargs)}")
        return push_folder(self.save_pretrained, repo_id, commit_message=commit_message, private=private,
                           token=token, branch=branch, create_pr=create_pr, delete_patterns=delete_patterns)
