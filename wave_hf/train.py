"""Stage 3: fine-tune a built ViT with the stock transformers ``Trainer``, and evaluate it.

Nothing here is a custom training loop: WAVE's output is a plain ``ViTForImageClassification``, so the
usual Hugging Face recipe applies unchanged.
"""

from __future__ import annotations

import os
import tempfile

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, ViTForImageClassification
from transformers.trainer_callback import PrinterCallback

from .data import collate_images
from .training import accuracy
from .validation import MAX_SEED, check_float, check_int


def _check_model_and_data(model: object, dataset: object, name: str) -> None:
    if not isinstance(model, ViTForImageClassification):
        raise TypeError(f"model must be a ViTForImageClassification, got {type(model).__name__}")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or isinstance(dataset, (str, bytes)):
        raise TypeError(f"{name} must be a map-style dataset (len and [i]), got {type(dataset).__name__}")


def evaluate(model: ViTForImageClassification, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``dataset`` (items with ``pixel_values`` and ``labels``), on the model's device."""
    _check_model_and_data(model, dataset, "dataset")
    batch_size = check_int("batch_size", batch_size, 1)
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return accuracy(model, dataset, batch_size)


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
) -> ViTForImageClassification:
    """Train every weight of ``model`` with the transformers ``Trainer`` (AdamW, cosine schedule).

    Returns the trained model (the same object). ``output_dir`` receives the Trainer's checkpoints; without
    it they go to a temporary folder that is removed afterwards.
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
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collate_images)
        if not progress:  # PrinterCallback prints the final metrics even with logging off
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    model.eval()
    return model
