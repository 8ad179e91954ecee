"""Local (block-by-block) FS-Merge: the SuperNet is trained one transformer block at a time, then its last layer.

Stage k trains SuperNet block k alone. Its merged input is a merge map applied to the *sources'* own inputs to
block k (every source on every image), and an unmerge map turns its merged output back into one prediction
per source, compared with that source's output of block k on every token, each target divided by its
per-dimension std (as ``normalize="standardize"``: residual streams differ in scale across models and grow
with depth, and no source should dominate). Block 0's input map is the SuperNet's own ``m_pre`` (the sources'
inputs to block 0 are their embeddings, so it is trained there and folded as usual); later blocks' input maps
and every output map are training-only scaffolding, dropped at fold time. Each block-k input map starts from
the trained block-(k-1) one and each output map from the previous output map, so that consecutive blocks
start in the same merged coordinates: the residual stream keeps a block's input coordinates, and the chained
(folded) network feeds block k what block k-1 produced, not what the sources did. That gap is where local
errors compound. A last stage therefore trains only the final LayerNorm and ``u_task`` (the per-task heads'
unmerge) on the chained SuperNet with the method's own loss, as the official code's last local block ends in
the output merger.

Every stage runs ``cfg``'s full length (``epochs`` / ``steps``), so the schedule takes depth + 1 times the
optimiser steps of the global one, but each step back-propagates through one block: activation memory is
one block's. Nothing outside the SuperNet's blocks, ``m_pre``, final LN and ``u_task`` reaches the fold, so the
result folds exactly like a globally trained SuperNet.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import vit_layout as L
from ..loop import LoopResult, LossFn
from .supernet import MergeMap, SuperBlock, SuperNet, UnmergeMap
from .train import Moments, Teachers, TrainConfig, _train, mean_loss, online_batches


class _StopForward(Exception):
    """Raised by a hook once the needed block has run: the sources skip their remaining blocks."""


@torch.no_grad()
def block_io(teachers: Teachers, pixel_values: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """Every source's input to and output of block ``layer`` on every image, each (B, T, N, d)."""
    ins, outs = [], []
    for model in teachers.models:
        kept: dict[str, Tensor] = {}
        blocks = L.encoder_layers(model)
        source = L.encoder(model).embeddings if layer == 0 else blocks[layer - 1]

        def keep(_m, _a, out, kept=kept) -> None:
            kept["in"] = out[0] if isinstance(out, tuple) else out

        def stop(_m, _a, out, kept=kept) -> None:
            kept["out"] = out[0] if isinstance(out, tuple) else out
            raise _StopForward

        hooks = [source.register_forward_hook(keep), blocks[layer].register_forward_hook(stop)]
        try:
            L.encoder(model)(pixel_values=pixel_values)
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        ins.append(kept["in"])
        outs.append(kept["out"])
    return torch.stack(ins, 2), torch.stack(outs, 2)


class BlockStage(nn.Module):
    """What stage k trains: the sources' block inputs (B, T, N, d) -> ``merge_in`` -> SuperNet block k ->
    ``unmerge_out`` -> one prediction per source of its block output (B, T, N, d)."""

    def __init__(self, merge_in: MergeMap, block: SuperBlock, unmerge_out: UnmergeMap):
        super().__init__()
        self.merge_in, self.block, self.unmerge_out = merge_in, block, unmerge_out

    def forward(self, inputs: Tensor) -> Tensor:
        return self.unmerge_out(self.block(self.merge_in(inputs)))


def block_loss_fn(teachers: Teachers, layer: int, scales: Tensor) -> LossFn:
    """The loop's loss of stage ``layer``: the sources' block input and output on this step's images (no
    grad), then the standardised MSE of the stage's per-source predictions, every token. The targets go back
    into the batch so that the loop checks them for NaN/Inf."""
    state: dict[str, Any] = {"device": None, "scales": scales}

    def loss_fn(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x = batch["pixel_values"]
        if state["device"] != x.device:
            teachers.to(x.device)
            state["device"], state["scales"] = x.device, scales.to(x.device)
        h_in, h_out = block_io(teachers, x, layer)
        batch["targets"] = h_out
        return ((module(h_in) - h_out) / state["scales"]).pow(2).mean()

    return loss_fn


@torch.no_grad()
def block_scales(teachers: Teachers, images: Sequence[Tensor], layer: int, batch_size: int = 64) -> Tensor:
    """(N, d): each source's per-dimension std of its block-``layer`` output over every original merge image
    and token (every source is a target on every image here)."""
    x = torch.cat(list(images))
    acc = [Moments() for _ in teachers.models]
    device = next(teachers.parameters()).device
    for i in range(0, len(x), batch_size):
        out = block_io(teachers, x[i : i + batch_size].to(device), layer)[1]
        for j, m in enumerate(acc):
            m.add(out[:, :, j])
    return torch.stack([m.std() for m in acc])


def _stage_config(cfg: TrainConfig, name: str, offset: int) -> TrainConfig:
    """``cfg`` for the stage whose steps start after ``offset`` steps of the schedule: its checkpoints in a
    sub-folder of its own (each stage is its own resumable loop run) and ``stop_after``, a step of the whole
    schedule, made the stage's own (so that rerunning an interrupted run resumes it rather than stopping
    again in every stage)."""
    changes: dict[str, Any] = {}
    if cfg.output_dir is not None:
        changes["output_dir"] = str(Path(cfg.output_dir) / "local" / name)
    if cfg.stop_after is not None:
        changes["stop_after"] = cfg.stop_after - offset
    return replace(cfg, **changes)


def train_local(net: SuperNet, models: Sequence[nn.Module], data: Any, cfg: TrainConfig,
                fingerprint: dict[str, Any], train_final: Callable[[SuperNet, TrainConfig], tuple[LoopResult, float, float]]
                ) -> tuple[LoopResult, float | None, float | None, list[dict[str, Any]]]:
    """Train ``net`` block by block, then its last layer (see the module docstring), in place.

    ``train_final(net, cfg) -> (LoopResult, before, after)`` trains whatever of ``net`` requires a gradient on
    the method's own loss (the global path). Returns the stages' combined ``LoopResult``, the final stage's
    loss before and after it (None when the run stopped before it), and per trained block ``{"block",
    "loss_before", "loss_after"}`` (the standardised block loss on the fixed merge images). ``stop_after``
    counts the steps of every stage together; the run ends where it falls.
    """
    teachers = Teachers(models)
    images = data.all_images()
    depth = len(net.blocks)
    per_stage = cfg.total_steps(len(online_batches(images, cfg)[0]))
    result = LoopResult(total_steps=per_stage * (depth + 1))
    stages: list[dict[str, Any]] = []
    # the first output map is a copy of the untrained u_task (every source reads the merged stream)
    merge_in, unmerge_out = net.m_pre, copy.deepcopy(net.u_task)
    net.requires_grad_(False)
    for layer, block in enumerate(net.blocks):
        if cfg.stop_after is not None and cfg.stop_after <= layer * per_stage:
            break
        if layer > 0:
            merge_in = copy.deepcopy(merge_in)  # a scaffold, starting where the previous block's input map ended
        stage = BlockStage(merge_in, block, unmerge_out).requires_grad_(True)
        scales = block_scales(teachers, data.originals, layer)
        loss_fn = block_loss_fn(teachers, layer, scales)
        start = mean_loss(stage, loss_fn, images)
        stage_cfg = _stage_config(cfg, f"block{layer}", layer * per_stage)
        batches, sampler = online_batches(images, stage_cfg)
        hashes = lambda batches=batches: f"{batches.fingerprint()}|teachers={teachers.fingerprint()}"  # noqa: E731
        res = _train(stage, batches, sampler, hashes, loss_fn, stage_cfg,
                     {**fingerprint, "schedule": "local", "stage": f"block{layer}"})
        stage.requires_grad_(False)
        net.to(next(stage.parameters()).device)  # the loop may have moved only this stage's modules
        stages.append({"block": layer, "loss_before": start, "loss_after": mean_loss(stage, loss_fn, images)})
        _add(result, res)
    before = after = None
    if cfg.stop_after is None or cfg.stop_after > depth * per_stage:
        net.final_ln.requires_grad_(True)
        net.u_task.requires_grad_(True)
        res, before, after = train_final(net, _stage_config(cfg, "final", depth * per_stage))
        _add(result, res)
    result.stopped_early = result.steps_done < result.total_steps
    net.requires_grad_(True)  # the SuperNet's trainable layout as the global schedule reports it
    return result, before, after, stages


def _add(total: LoopResult, part: LoopResult) -> None:
    """Accumulate one stage's run into the schedule's."""
    total.losses += part.losses
    total.steps_done += part.steps_done
    total.num_processes = part.num_processes
