"""Stage 3: fine-tune a built ViT with the stock transformers ``Trainer``, and evaluate it.

Nothing here is a custom training loop: WAVE's output is a plain ``ViTForImageClassification``, so the
usual Hugging Face recipe applies unchanged. The one option beyond ``TrainingArguments`` is layer-wise
learning-rate decay (``layer_decay``), given to the Trainer as parameter groups of its own optimizer.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, ViTForImageClassification
from transformers.trainer_callback import PrinterCallback

from .data import collate_images
from .training import accuracy
from .validation import MAX_SEED, check_float, check_int
from .vit_layout import depth_position


def _check_model(model: object) -> None:
    if not isinstance(model, ViTForImageClassification):
        raise TypeError(f"model must be a ViTForImageClassification, got {type(model).__name__}")


def _check_model_and_data(model: object, dataset: object, name: str) -> None:
    _check_model(model)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or isinstance(dataset, (str, bytes)):
        raise TypeError(f"{name} must be a map-style dataset (len and [i]), got {type(dataset).__name__}")


def evaluate(model: ViTForImageClassification, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``dataset`` (items with ``pixel_values`` and ``labels``), on the model's device."""
    _check_model_and_data(model, dataset, "dataset")
    batch_size = check_int("batch_size", batch_size, 1)
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return accuracy(model, dataset, batch_size)


def check_layer_decay(layer_decay: Any) -> float:
    """``layer_decay`` as a float in (0, 1] (1 = off); else a ``ValueError``/``TypeError`` naming the value."""
    return check_float("layer_decay", layer_decay, 0, 1, low_open=True)


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters the stock ``Trainer`` applies weight decay to: everything but biases and
    LayerNorm weights (``Trainer.get_decay_parameter_names``, which reads no Trainer state, so no Trainer is
    built for it)."""
    return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


def layerwise_lr_groups(model: ViTForImageClassification, lr: float, layer_decay: float,
                        weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay (BEiT, DeiT III).

    For a ViT of ``L`` blocks: block ``l`` (``0 <= l < L``) trains at ``lr * layer_decay ** (L - l)``, the
    embeddings (patch projection, CLS token, positions) at ``lr * layer_decay ** (L + 1)``, the final LayerNorm
    and the classifier at ``lr``. Weight decay follows the stock ``Trainer``: ``weight_decay`` on the
    parameters of ``decay_parameter_names``, 0 on biases and LayerNorms. Every trainable parameter is in
    exactly one group (frozen ones in none); the groups run from the full lr down to the embeddings, so
    group 0 (the one the Trainer logs) has the full lr; empty groups are left out. ``layer_decay=1`` gives
    every group ``lr``: the same updates as the Trainer's own two groups.
    """
    _check_model(model)
    lr = check_float("lr", lr, 0, low_open=True)
    layer_decay = check_layer_decay(layer_decay)
    weight_decay = check_float("weight_decay", weight_decay, 0)
    depth = model.config.num_hidden_layers
    decayed = decay_parameter_names(model)
    buckets: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((depth_position(name, depth), name in decayed), []).append(param)
    groups = []
    for position in range(depth + 1, -1, -1):
        for with_decay in (True, False):
            params = buckets.get((position, with_decay))
            if params:
                groups.append({"params": params, "lr": lr * layer_decay ** (depth + 1 - position),
                               "weight_decay": weight_decay if with_decay else 0.0})
    return groups


def layer_decay_optimizer(args: TrainingArguments, model: ViTForImageClassification,
                          layer_decay: float) -> tuple[type[torch.optim.Optimizer], dict[str, Any]] | None:
    """The ``Trainer``'s ``optimizer_cls_and_kwargs`` for layer-wise lr decay: the optimizer ``args`` asks for
    (AdamW by default, with its betas, eps and fused flag), over ``layerwise_lr_groups`` at
    ``args.learning_rate`` and ``args.weight_decay``. ``None`` at ``layer_decay=1``: the Trainer then builds
    its own optimizer, so turning the option off is today's training bit for bit. The Trainer's scheduler
    scales each group's lr, keeping the ratios."""
    if check_layer_decay(layer_decay) == 1.0:
        return None
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = layerwise_lr_groups(model, args.learning_rate, layer_decay, args.weight_decay)
    return optimizer_cls, {**kwargs, "params": groups}


def finetune(
    model: ViTForImageClassification,
    train_dataset: Dataset,
    *,
    output_dir: str | os.PathLike | None = None,
    epochs: float = 1.0,
    learning_rate: float = 5e-4,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    seed: int = 0,
    progress: bool = True,
    layer_decay: float = 1.0,
) -> ViTForImageClassification:
    """Train every weight of ``model`` with the transformers ``Trainer`` (AdamW, cosine schedule).

    ``layer_decay`` in (0, 1]: layer-wise learning-rate decay (``layerwise_lr_groups``: block ``l`` of ``L``
    at ``learning_rate * layer_decay ** (L - l)``, the embeddings at ``layer_decay ** (L + 1)``, the final
    LayerNorm and the classifier at the full rate); 1 (the default) turns it off. Returns the trained model
    (the same object). ``output_dir`` receives the Trainer's checkpoints; without it they go to a temporary
    folder that is removed afterwards.
    """
    _check_model_and_data(model, train_dataset, "train_dataset")
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty: fine-tuning needs at least one labelled image")
    # Checked here, not by TrainingArguments: it accepts epochs=-1 (no training at all) and lr=nan.
    epochs = check_float("epochs", epochs, 0, low_open=True)
    learning_rate = check_float("learning_rate", learning_rate, 0, low_open=True)
    batch_size = check_int("batch_size", batch_size, 1)
    weight_decay = check_float("weight_decay", weight_decay, 0)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    seed = check_int("seed", seed, 0, MAX_SEED)
    layer_decay = check_layer_decay(layer_decay)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=os.fspath(output_dir or tmp),
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            per_device_train_batch_size=batch_size,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            lr_scheduler_type="cosine",
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collate_images,
                          optimizer_cls_and_kwargs=layer_decay_optimizer(args, model, layer_decay))
        if not progress:  # PrinterCallback prints the final metrics even with logging off
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    model.eval()
    return model
