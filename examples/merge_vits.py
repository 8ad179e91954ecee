"""Merge two ViTs trained from different inits on different tasks with FS-Merge, save, reload.

    python examples/merge_vits.py [--quick] [--out outputs/merged]

Uses two tiny ViTs trained for a few steps so that it runs in about a minute on a laptop CPU; swap in your
own ``ViTForImageClassification`` folders or Hub repo ids. The saved folder holds one plain transformers
model per task: ``ViTForImageClassification.from_pretrained("outputs/merged/digits")``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import ViTConfig, ViTForImageClassification

from wave_hf.merge import MergedViT, merge


def toy_task(seed: int, n: int = 256):
    """Random images whose label is the quadrant holding the brightest blob (a learnable toy task)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, r * 14 + 3 : r * 14 + 11, c * 14 + 3 : c * 14 + 11] += 1.0 + seed
    return x, y


def train_source(seed: int, x, y, steps: int) -> ViTForImageClassification:
    torch.manual_seed(seed)  # each source model has its own random init
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    image_size=28, patch_size=7, num_channels=1, num_labels=4)
    model = ViTForImageClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _step in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = model(pixel_values=x[idx], labels=y[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="outputs/merged")
    args = p.parse_args()
    steps = 30 if args.quick else 200
    tasks = ["blobs_a", "blobs_b"]
    data = [toy_task(1), toy_task(2)]
    models = [train_source(seed, x, y, steps) for seed, (x, y) in zip((10, 20), data)]

    merged = merge(models, tasks, method="fs_merge", train_datasets=[x for x, _ in data], images_per_task=100,
                   augment_copies=2, rank=4, epochs=2 if args.quick else 10, progress=not args.quick)
    acc = {}
    for task, (x, y) in zip(tasks, data):
        with torch.no_grad():
            acc[task] = (merged.for_task(task)(pixel_values=x).logits.argmax(-1) == y).float().mean().item()
    print("per-task accuracy of the merged model:", acc)
    merged.save_pretrained(args.out, accuracies=acc)
    again = MergedViT.from_pretrained(args.out)
    print("reloaded:", again, "->", args.out)


if __name__ == "__main__":
    main()
