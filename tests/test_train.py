"""Stage 3: the stock Trainer fine-tunes a built model; evaluation counts correctly."""

from __future__ import annotations

import torch

from wave_hf.train import evaluate, finetune


def data(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(1, 28, 28, generator=g), "labels": i % 3} for i in range(n)]


def test_finetune_with_trainer_changes_every_weight_and_is_deterministic(tiny_init, tmp_path):
    before = tiny_init.build(depth=1, width=16, num_labels=3)
    start = {k: v.clone() for k, v in before.state_dict().items()}
    a = finetune(before, data(32), epochs=1, batch_size=8, output_dir=tmp_path / "a", progress=False)
    changed = [k for k, v in a.state_dict().items() if not torch.equal(v, start[k])]
    assert len(changed) == len(start)
    b = finetune(tiny_init.build(depth=1, width=16, num_labels=3), data(32), epochs=1, batch_size=8,
                 output_dir=tmp_path / "b", progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_evaluate_counts_correct_predictions(tiny_init):
    model = tiny_init.build(depth=1, width=16, num_labels=3)
    items = data(10)
    with torch.no_grad():
        preds = model(torch.stack([x["pixel_values"] for x in items])).logits.argmax(-1)
    expected = sum(int(p) == x["labels"] for p, x in zip(preds, items)) / 10
    assert evaluate(model, items, batch_size=4) == expected
