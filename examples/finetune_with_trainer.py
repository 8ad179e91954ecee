"""Build a ViT from a WAVE template bank, fit its scalers, and fine-tune it with the stock transformers Trainer.

    python examples/finetune_with_trainer.py --depth 6 --width 128 --out vit-6x128
    python examples/finetune_with_trainer.py --bank someone/wave-bank --revision v1 --data fashion_mnist

The saved folder is a plain ViTForImageClassification: load it with transformers alone.
"""

from __future__ import annotations

import argparse

import numpy as np
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from wave_hf import WaveInitializer
from wave_hf.data import collate_images, load_image_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default="default", help="bank folder, Hub repo id, or 'default' (embedded)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", default="outputs/vit-finetuned")
    args = parser.parse_args()

    init = WaveInitializer.from_pretrained(args.bank, revision=args.revision)
    cfg = init.config
    data = load_image_dataset(args.data, image_size=cfg.image_size, num_channels=cfg.num_channels,
                              train_limit=args.train_images, test_limit=args.test_images)
    id2label = dict(enumerate(data["train"].features["label"].names))

    # Stage 2: size-specific scalers on a little data, templates frozen.
    scalers = init.fit_scalers(args.depth, args.width, data["train"], steps=args.fit_steps)
    model = init.build(args.depth, args.width, id2label=id2label, scalers=scalers)

    # Stage 3: ordinary fine-tuning of every weight.
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.out, num_train_epochs=args.epochs, learning_rate=5e-4,
                               per_device_train_batch_size=64, lr_scheduler_type="cosine", weight_decay=0.05,
                               remove_unused_columns=False, save_strategy="no", report_to=[], use_cpu=True),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=collate_images,
        compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
    )
    trainer.train()
    print(trainer.evaluate())
    trainer.save_model(args.out)
    reloaded = ViTForImageClassification.from_pretrained(args.out)
    print(f"saved {args.out}: {sum(p.numel() for p in reloaded.parameters()):,} parameters")


if __name__ == "__main__":
    main()
