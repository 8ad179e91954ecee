"""Permutation alignment by activation matching (Git Re-Basin / ZipIt!-style, without zipping), then
averaging. Models 2..N are each aligned to model 1 with ``scipy.optimize.linear_sum_assignment`` on
activation correlations over the merge images of all tasks:

* one residual-stream permutation shared by every block (matched on the embeddings and every block output),
  applied to patch/cls/pos, every LayerNorm, the inputs of q/k/v/fc1, the outputs of o/fc2, and the heads;
* the MLP hidden units of each layer (matched on the GELU outputs);
* the attention heads of each layer as units (matched on their context vectors), and inside each matched
  head the value dims (context) and the query/key dims (one permutation for both keeps q.k unchanged).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .. import vit_layout as L
from .common import MergeData, average_states, encoder_state, head_state
from .merged import from_encoder
from .registry import MergeMethod, register_merge_method


@torch.no_grad()
def activations(model, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Residual stream, MLP hidden, context, q and k of every layer, flattened over tokens."""
    acts: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def keep(name, x):
        acts.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).double())

    for i, block in enumerate(L.encoder_layers(model)):
        fc2, o = L.submodule(block, L.LAYER_LINEARS["fc2"]), L.submodule(block, L.LAYER_LINEARS["o"])
        q, k = L.submodule(block, L.LAYER_LINEARS["q"]), L.submodule(block, L.LAYER_LINEARS["k"])
        hooks += [fc2.register_forward_hook(lambda m, a, out, i=i: keep(f"mlp{i}", a[0])),
                  o.register_forward_hook(lambda m, a, out, i=i: keep(f"ctx{i}", a[0])),
                  q.register_forward_hook(lambda m, a, out, i=i: keep(f"q{i}", out)),
                  k.register_forward_hook(lambda m, a, out, i=i: keep(f"k{i}", out))]
    model.eval()
    try:
        for s in range(0, len(images), batch_size):
            out = L.encoder(model)(pixel_values=images[s : s + batch_size], output_hidden_states=True)
            for h in out.hidden_states:
                keep("res", h)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}


def _standardize(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0)
    return x / x.norm(dim=0).clamp_min(1e-12)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _standardize(a).T @ _standardize(b)


def match(corr: torch.Tensor) -> tuple[np.ndarray, float]:
    """perm with new unit a = old unit perm[a] maximizing the summed correlation, and that sum."""
    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    return cols[np.argsort(rows)], float(corr[rows, cols].sum())


def head_permutation(ref: dict, other: dict, layer: int, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (over d) for the v/o dims and the q/k dims of ``other`` in ``layer``."""
    ctx_a, ctx_b = ref[f"ctx{layer}"], other[f"ctx{layer}"]
    qk_a = torch.cat([ref[f"q{layer}"], ref[f"k{layer}"]])
    qk_b = torch.cat([other[f"q{layer}"], other[f"k{layer}"]])
    hd = ctx_a.shape[1] // num_heads
    c_ctx, c_qk = correlation(ctx_a, ctx_b), correlation(qk_a, qk_b)
    score = np.zeros((num_heads, num_heads))
    inner = {}
    for a in range(num_heads):
        for b in range(num_heads):
            sa, sb = slice(a * hd, (a + 1) * hd), slice(b * hd, (b + 1) * hd)
            pv, sv = match(c_ctx[sa, sb])
            pqk, sqk = match(c_qk[sa, sb])
            score[a, b] = sv + sqk
            inner[a, b] = (pv, pqk)
    heads, _ = match(torch.from_numpy(score))
    idx_v = np.concatenate([heads[a] * hd + inner[a, heads[a]][0] for a in range(num_heads)])
    idx_qk = np.concatenate([heads[a] * hd + inner[a, heads[a]][1] for a in range(num_heads)])
    return idx_v, idx_qk


def permute_state(state: dict, head: tuple, perms: dict, depth: int) -> tuple[dict, tuple]:
    """Apply residual / per-layer MLP / per-layer head permutations to an encoder state and a head."""
    s = {k: v.clone() for k, v in state.items()}
    p = torch.as_tensor(perms["res"])
    g = L.global_key
    s[g("patch_weight")] = s[g("patch_weight")][p]
    s[g("patch_bias")] = s[g("patch_bias")][p]
    s[g("cls")] = s[g("cls")][..., p]
    s[g("pos")] = s[g("pos")][..., p]
    s[g("final_ln_weight")], s[g("final_ln_bias")] = s[g("final_ln_weight")][p], s[g("final_ln_bias")][p]
    for i in range(depth):
        k = lambda n, i=i: L.layer_key(i, n)  # noqa: E731
        for n in ("ln1_weight", "ln1_bias", "ln2_weight", "ln2_bias", "o_bias", "fc2_bias"):
            s[k(n)] = s[k(n)][p]
        hid = torch.as_tensor(perms[f"mlp{i}"])
        s[k("fc1")] = s[k("fc1")][hid][:, p]
        s[k("fc1_bias")] = s[k("fc1_bias")][hid]
        s[k("fc2")] = s[k("fc2")][p][:, hid]
        iv, iqk = (torch.as_tensor(a) for a in perms[f"heads{i}"])
        for n in ("q", "k"):
            s[k(n)] = s[k(n)][iqk][:, p]
            s[k(f"{n}_bias")] = s[k(f"{n}_bias")][iqk]
        s[k("v")] = s[k("v")][iv][:, p]
        s[k("v_bias")] = s[k("v_bias")][iv]
        s[k("o")] = s[k("o")][p][:, iv]
    w, b = head
    return s, (w[:, p].clone(), b.clone())


def align(ref_model, model, images: torch.Tensor, ref_acts: dict | None = None) -> dict:
    """Permutations that align ``model`` to ``ref_model`` (see the module docstring)."""
    ref_acts = ref_acts if ref_acts is not None else activations(ref_model, images)
    acts = activations(model, images)
    perms = {"res": match(correlation(ref_acts["res"], acts["res"]))[0]}
    for i in range(model.config.num_hidden_layers):
        perms[f"mlp{i}"] = match(correlation(ref_acts[f"mlp{i}"], acts[f"mlp{i}"]))[0]
        perms[f"heads{i}"] = head_permutation(ref_acts, acts, i, model.config.num_attention_heads)
    return perms


def matching_images(originals: Sequence[torch.Tensor], max_images: int) -> torch.Tensor:
    """The original merge images of every task, pooled; a fixed random subset of ``max_images`` if more."""
    x = torch.cat(list(originals))
    if len(x) > max_images:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_images]]
    return x


def aligned_states(models, x: torch.Tensor) -> tuple[list[dict], list[tuple]]:
    """Encoder states and heads of every model, models 2..N permuted onto model 1 by activation matching."""
    ref_acts = activations(models[0], x)
    depth = models[0].config.num_hidden_layers
    states, heads = [encoder_state(models[0])], [head_state(models[0])]
    for m in models[1:]:
        s, h = permute_state(encoder_state(m), head_state(m), align(models[0], m, x, ref_acts), depth)
        states.append(s)
        heads.append(h)
    return states, heads


def aligned_models(models, x: torch.Tensor) -> list:
    """Copies of the models with 2..N permuted onto model 1 (each computes exactly its original's logits; only
    its hidden units are reordered). FS-Merge's ``init="permute"`` builds its SuperNet over these, so that the
    averaged maps already combine matched units and every model contributes from step 0."""
    states, heads = aligned_states(models, x)
    out = [models[0]]
    for m, s, (hw, hb) in zip(models[1:], states[1:], heads[1:]):
        c = copy.deepcopy(m)
        full = c.state_dict()
        full.update(s)
        full.update(dict(zip(L.classifier_keys(), (hw, hb))))
        c.load_state_dict(full)
        out.append(c.eval())
    return out


@register_merge_method("permute")
@dataclass
class Permute(MergeMethod):
    uses_augmented = False
    max_images: int = 512  # images (pooled over tasks) used for matching

    def run(self, models, tasks, data: MergeData):
        states, heads = aligned_states(models, matching_images(data.originals, self.max_images))
        merged = from_encoder(models, tasks, average_states(states))
        merged.heads = dict(zip(tasks, heads))
        return merged
