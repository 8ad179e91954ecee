"""FS-Merge (Kinderman et al., arXiv 2410.01483): train a Foldable SuperNet by global feature
reconstruction, then fold it into one stock ViT + one head per task."""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import MAX_RANK, check_int
from .common import MergeData, routed_targets
from .registry import MergeMethod, register_merge_method
from .supernet import SuperNet
from .train import TrainConfig, TrainingOptions, reconstruction_loss, train_reconstruction


@register_merge_method("fs_merge")
@dataclass
class FSMerge(TrainingOptions, MergeMethod):
    """Args:
    rank: rank r of the low-rank part of each width-d M/U (MLP-hidden maps get 4r); 0 = diagonal only.
    init: "first" (starts as model 1) or "average" (starts as the weight average).
    epochs / steps: training length (``steps`` overrides); batch_size; lr (low-rank factors and LNs);
    lr_diag (the diagonals); weight_decay. output_dir: resumable checkpoints; stop_after: for tests.
    """

    rank: int = 8
    init: str = "first"
    lr_diag: float = 1e-3

    def __post_init__(self):
        self.rank = check_int("rank", self.rank, 0, MAX_RANK, hint=" (validation.MAX_RANK)")
        self.train_config()  # validate early

    def train_config(self, lr_diag: float | None = None) -> TrainConfig:
        return super().train_config(self.lr_diag if lr_diag is None else lr_diag)

    def build(self, models, tasks) -> SuperNet:
        return SuperNet(models, tasks, rank=self.rank, init=self.init, seed=self.seed)

    def run(self, models, tasks, data: MergeData):
        net = self.build(models, tasks)
        x, ids, y = routed_targets(models, data.all_images())
        before = reconstruction_loss(net, x, ids, y)
        res = train_reconstruction(net, x, ids, y, self.train_config(),
                                   fingerprint={"method": "fs_merge", "rank": self.rank, "init": self.init})
        merged = net.fold()
        merged.metadata.update({
            "trainable_parameters": net.num_trainable(),
            "loss_before": before,
            "loss_after": reconstruction_loss(net, x, ids, y),
            "steps": res.steps_done,
            "total_steps": res.total_steps,
            "stopped_early": res.stopped_early,
        })
        merged.supernet = net  # kept for inspection (not saved)
        return merged
