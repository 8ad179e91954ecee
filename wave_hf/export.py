"""Model folders that stock ``transformers`` runs as they are: weights, an image processor and a card.

``pipeline("image-classification")`` converts every image to RGB before the image processor sees it, and
no stock processor turns RGB back into one channel. A grey (1-channel) model is therefore written as an
RGB model whose patch embedding is the grey one divided by three on each channel: on a grey image
replicated to RGB it computes exactly what the grey model computes (up to float rounding), and on a colour
image it sees the channel mean, which is what ``wave_hf.data`` feeds a grey model. The saved
``ViTImageProcessor`` (resize, ``/255``, the bank's mean and std) is the normalisation of ``wave_hf.data``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import ViTForImageClassification, ViTImageProcessorPil
from transformers.image_utils import PILImageResampling

from . import cards
from . import vit_layout as L
from .data import Preprocessing
from .io import publish_dir, require_finite

_RESAMPLE = {"nearest": PILImageResampling.NEAREST, "bilinear": PILImageResampling.BILINEAR,
             "bicubic": PILImageResampling.BICUBIC}


def image_processor(image_size: int, preprocessing: Preprocessing | None = None) -> ViTImageProcessorPil:
    """The RGB processor that reproduces ``wave_hf.data``'s preprocessing (the PIL backend: no torchvision).

    ``preprocessing`` is the bank's (its teacher's mean, std and resize filter); by default wave-hf's own
    ``(x / 255 - 0.5) / 0.5``. A grey pair is spread over the three channels, as the RGB fold needs.
    """
    prep = (preprocessing or Preprocessing()).for_channels(3)
    return ViTImageProcessorPil(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=_RESAMPLE[prep.resample],
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(prep.image_mean),
        image_std=list(prep.image_std), do_convert_rgb=True,
    )


@torch.no_grad()
def rgb_model(model: ViTForImageClassification) -> ViTForImageClassification:
    """The same classifier taking RGB input: a grey patch embedding spread over three channels (see above).

    An RGB model is returned as it is; anything but 1 or 3 channels is refused.
    """
    channels = model.config.num_channels
    if channels == 3:
        return model
    if channels != 1:
        raise ValueError(f"only grey (1-channel) and RGB models can be exported for pipelines, got "
                         f"num_channels={channels}")
    config = copy.deepcopy(model.config)
    config.num_channels = 3
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = L.global_key("patch_weight")
    state[key] = (state[key] / 3).expand(-1, 3, -1, -1).contiguous()
    out = L.empty_classifier(config)
    out.load_state_dict(state, strict=True, assign=True)
    return out.eval()


def model_card(model: ViTForImageClassification, *, origin: str, repo_id: str = "path/to/model",
               grey_fold: bool = False, accuracy: float | None = None, dataset: str | None = None,
               base_model: str | None = None) -> ModelCard:
    """A card that the Hub validates: metadata from what is known, a model-index only for a measured result."""
    c = model.config
    labels = [c.id2label[i] for i in sorted(c.id2label)] if c.id2label else []
    evals = None
    if accuracy is not None and dataset:
        evals = [EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                            metric_type="accuracy", metric_value=float(accuracy))]
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-classification", tags=["wave-hf", "vit"],
        base_model=base_model if cards.is_repo_id(base_model) else None,
        model_name=f"vit-{c.num_hidden_layers}x{c.hidden_size}" if evals else None, eval_results=evals,
    )
    shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
    return ModelCard.from_template(
        data, template_path=str(cards.template_path("model_card.md")),
        title=f"ViT {c.num_hidden_layers}x{c.hidden_size} ({origin})", depth=c.num_hidden_layers,
        width=c.hidden_size, heads=c.num_attention_heads, params=f"{sum(p.numel() for p in model.parameters()):,}",
        origin=origin, image_size=c.image_size, patch_size=c.patch_size, grey_fold=grey_fold,
        num_labels=c.num_labels, labels=shown, accuracy=accuracy, dataset=dataset or "", repo_id=repo_id,
    )


def write_model_folder(model: ViTForImageClassification, folder: Path, *, origin: str,
                       preprocessing: Preprocessing | None = None, **card: Any) -> ViTForImageClassification:
    """Write a pipeline-ready folder into ``folder`` (a staging folder: callers publish it); returns the
    model as written (RGB)."""
    ready = rgb_model(model)
    require_finite(ready.state_dict().items(), "the model")
    ready.save_pretrained(folder)
    image_processor(ready.config.image_size, preprocessing).save_pretrained(folder)
    model_card(ready, origin=origin, grey_fold=model.config.num_channels == 1, **card).save(folder / "README.md")
    return ready


def save_for_pipeline(model: ViTForImageClassification, save_directory: str | os.PathLike, *,
                      origin: str = "wave-hf", preprocessing: Preprocessing | None = None, **card: Any) -> Path:
    """Save ``model`` so that ``pipeline("image-classification", model=save_directory)`` runs it as trained.

    ``preprocessing`` is what the model was trained with (``Preprocessing.from_config(bank_config)`` for a
    model built from a bank; wave-hf's default otherwise). ``card`` takes ``accuracy``, ``dataset``, ``base_model`` (a Hub repo id) and ``repo_id`` for the card.
    Other files in ``save_directory`` are kept; each file lands atomically.
    """
    with publish_dir(save_directory) as tmp:
        write_model_folder(model, tmp, origin=origin, preprocessing=preprocessing, **card)
    return Path(save_directory)
