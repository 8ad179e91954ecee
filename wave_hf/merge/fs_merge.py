"""FS-Merge (Kinderman et al., arXiv 2410.01483): train a Foldable SuperNet by feature reconstruction (global,
end to end, or local, block by block: ``local.py``), then fold it into one stock ViT + one head per task."""

from __future__ import annotations

from dataclasses import dataclass

from ..loop import LoopResult
from ..validation import MAX_RANK, check_int
from .common import MergeData, check_choice, routed_targets
from .local import train_local
from .permute import aligned_models, matching_images
from .registry import MergeMethod, register_merge_method
from .supernet import INITS, SuperNet
from .train import TrainConfig, TrainingOptions, reconstruction_loss, run_online, train_reconstruction

FS_INITS = (*INITS, "permute")
SCHEDULES = ("global", "local")


@register_merge_method("fs_merge")
@dataclass
class FSMerge(TrainingOptions, MergeMethod):
    """Args:
    rank: rank r of the low-rank part of each width-d M/U (MLP-hidden maps get 4r); 0 = diagonal only.
    init: "permute" (the default: models 2..N permuted onto model 1 by activation matching on the merge
        images, then averaged: starts as the ``permute`` baseline, so every model contributes from step 0;
        ``match_images`` images are used), "first" (starts as model 1: the others' paths start at zero) or
        "average" (starts as the weight average). ``permute`` was chosen on validation over "first", the
        official augmentation and the inner-feature losses (``benchmarks/results/merge.md``: 73 vs 57 %
        average validation accuracy at N=2, 100 images per task, 20 epochs, 3 seeds).
    epochs / steps: training length (``steps`` overrides); batch_size; lr (low-rank factors and LNs);
    lr_diag (the diagonals); weight_decay. output_dir: resumable checkpoints; stop_after: for tests.
    augmentation ("shift" | "online"), online_views, augment_config: the data (see ``TrainingOptions``).
    tokens, inner, inner_layers, inner_weight, targets, normalize: the loss (see ``ReconstructionSpec``).
    schedule: "global" (the paper's default: the whole SuperNet end to end on that loss) or "local" (one block at
        a time against the sources' own block outputs, then the final LayerNorm and ``u_task`` on that loss;
        each stage runs the full ``epochs`` / ``steps``; activation memory is one block's; see ``local.py``).
    """

    rank: int = 8
    init: str = "permute"
    lr_diag: float = 1e-3
    match_images: int = 512
    schedule: str = "global"

    def __post_init__(self):
        self.rank = check_int("rank", self.rank, 0, MAX_RANK, hint=" (validation.MAX_RANK)")
        check_choice("init", self.init, FS_INITS)
        check_choice("schedule", self.schedule, SCHEDULES)
        self.match_images = check_int("match_images", self.match_images, 1)
        self.train_config()  # validate early

    def train_config(self, lr_diag: float | None = None) -> TrainConfig:
        return super().train_config(self.lr_diag if lr_diag is None else lr_diag)

    def build(self, models, tasks) -> SuperNet:
        init = "average" if self.init == "permute" else self.init
        return SuperNet(models, tasks, rank=self.rank, init=init, seed=self.seed)

    def run(self, models, tasks, data: MergeData):
        cfg = self.train_config()
        if self.init == "permute":  # function-preserving copies: targets and heads move with the units
            models = aligned_models(models, matching_images(data.originals, self.match_images))
        net = self.build(models, tasks)
        fingerprint = {"method": "fs_merge", "rank": self.rank, "init": self.init}
        train_global = lambda module, c: _train_global(module, models, data, c, fingerprint)  # noqa: E731
        stages = None
        if self.schedule == "local":
            res, before, after, stages = train_local(net, models, data, cfg, fingerprint, train_global)
        else:
            res, before, after = train_global(net, cfg)
        merged = net.fold()
        if stages is not None:
            merged.metadata["local_stages"] = stages
        merged.metadata.update({
            "trainable_parameters": net.num_trainable(),
            "loss_before": before,
            "loss_after": after,
            "steps": res.steps_done,
            "total_steps": res.total_steps,
            "stopped_early": res.stopped_early,
        })
        merged.supernet = net  # kept for inspection (not saved)
        return merged


def _train_global(net: SuperNet, models, data: MergeData, cfg: TrainConfig, fingerprint: dict
                  ) -> tuple[LoopResult, float, float]:
    """Train what of ``net`` requires a gradient end to end on the method's loss; with its loss before and after."""
    if cfg.online:
        return run_online(net, models, data, cfg, fingerprint)
    x, ids, y = routed_targets(models, data.all_images())
    before = reconstruction_loss(net, x, ids, y)
    res = train_reconstruction(net, x, ids, y, cfg, fingerprint=fingerprint)
    return res, before, reconstruction_loss(net, x, ids, y)
