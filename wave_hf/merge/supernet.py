"""The Foldable SuperNet of FS-Merge (arXiv 2410.01483) over N frozen HF ``ViTForImageClassification``.

Convention: **row vectors** (``y = x @ W.T + b`` as in ``nn.Linear``). For a wrapped linear layer with
frozen weights ``W_i`` (out x in) of model i::

    z_i = x @ U^(i)                    U = [U^(1) .. U^(N)],  U^(i) = diag(E_i) + F @ C_i     (unmerge)
    y_i = z_i @ W_i.T + b_i            frozen, per model
    y*  = sum_i y_i @ M^(i)            M^(i) = diag(D_i) + A_i @ B                            (merge)

``A = [A_1; ..; A_N]`` (N*e x r) and ``C = [C_1 .. C_N]`` (r x N*e) touch the N-model side and start at
zero (LoRA-style), so at init only the diagonals act. The maps are applied in this factored form and are
never materialised as dense (N*e x e) matrices during training. Everything else (LayerNorms, softmax
attention, GELU, residual adds, cls/pos) runs once on the merged width-d stream, which is what makes the
network foldable (see ``fold.py``): ``W* = sum_i M^(i).T W_i U^(i).T``, ``b* = sum_i b_i @ M^(i)``.

Because it is foldable, the merged feature is computed by folding first (differentiably, O(N d^2 r) per
linear) and running ONE stock ViT forward on the folded weights: the same function as the N per-model
streams (equal up to float rounding; tested), at about a KD step's cost and with activation memory that does
not grow with N. The per-model streams (``SuperBlock.forward_sites``) run only when a loss reads them (the
inner attention / MLP sites).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from transformers import ViTConfig, ViTForImageClassification, ViTModel
from transformers.activations import ACT2FN

from .. import vit_layout as L
from .common import head_state, id2label_of, validate_models
from .fold import fold_supernet, folded_encoder

INITS = ("first", "average")


class MergeMap(nn.Module):
    """M: N per-model features (..., N, e) -> one merged feature (..., e). Diagonal + rank-r."""

    def __init__(self, n: int, width: int, rank: int, init: str, generator: torch.Generator | None = None):
        super().__init__()
        self.n, self.width, self.rank = n, width, rank
        diag = torch.zeros(n, width)
        if init == "first":
            diag[0] = 1.0
        else:
            diag.fill_(1.0 / n)
        self.diag = nn.Parameter(diag)
        if rank > 0:
            self.a = nn.Parameter(torch.zeros(n * width, rank))  # N-model side: zero at init
            self.b = nn.Parameter(0.1 * width**-0.5 * torch.randn(rank, width, generator=generator) / rank)
        else:
            self.register_parameter("a", None)
            self.register_parameter("b", None)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = (y * self.diag).sum(-2)
        if self.a is not None:
            out = out + (y.flatten(-2) @ self.a) @ self.b
        return out

    def block(self, i: int) -> torch.Tensor:
        """M^(i) as an (e x e) matrix (fold time only)."""
        m = torch.diag(self.diag[i])
        if self.a is not None:
            m = m + self.a[i * self.width : (i + 1) * self.width] @ self.b
        return m


class UnmergeMap(nn.Module):
    """U: one merged feature (..., e) -> N per-model copies (..., N, e). Diagonal + rank-r."""

    def __init__(self, n: int, width: int, rank: int, init: str, generator: torch.Generator | None = None):
        super().__init__()
        self.n, self.width, self.rank = n, width, rank
        self.diag = nn.Parameter(torch.ones(n, width))
        if rank > 0:
            self.a = nn.Parameter(torch.zeros(rank, n * width))  # N-model side: zero at init
            self.b = nn.Parameter(0.1 * width**-0.5 * torch.randn(width, rank, generator=generator) / rank)
        else:
            self.register_parameter("a", None)
            self.register_parameter("b", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.unsqueeze(-2) * self.diag
        if self.a is not None:
            out = out + ((x @ self.b) @ self.a).unflatten(-1, (self.n, self.width))
        return out

    def block(self, i: int) -> torch.Tensor:
        """U^(i) as an (e x e) matrix (fold time only)."""
        u = torch.diag(self.diag[i])
        if self.a is not None:
            u = u + self.b @ self.a[:, i * self.width : (i + 1) * self.width]
        return u


def _per_model_linear(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """z (..., N, in), weight (N, out, in), bias (N, out) -> (..., N, out)."""
    return torch.einsum("...ni,noi->...no", z, weight) + bias


def _layernorm(config: ViTConfig, states: Sequence[dict], key: str, init: str) -> nn.LayerNorm:
    ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    src = [states[0]] if init == "first" else states
    with torch.no_grad():
        ln.weight.copy_(torch.stack([s[key + ".weight"] for s in src]).mean(0))
        ln.bias.copy_(torch.stack([s[key + ".bias"] for s in src]).mean(0))
    return ln


class SuperBlock(nn.Module):
    """One ViT block of the SuperNet: per-model frozen linears wrapped by U/M, the rest merged."""

    def __init__(self, config: ViTConfig, states: Sequence[dict], layer: int, rank: int, init: str,
                 generator: torch.Generator | None):
        super().__init__()
        n, d, h = len(states), config.hidden_size, config.intermediate_size
        self.num_heads = config.num_attention_heads
        pre = f"{L.ENCODER_PREFIX}layers.{layer}."
        for name, path in L.LAYER_LINEARS.items():
            self.register_buffer(f"w_{name}", torch.stack([s[pre + path + ".weight"] for s in states]))
            self.register_buffer(f"b_{name}", torch.stack([s[pre + path + ".bias"] for s in states]))
        self.ln1 = _layernorm(config, states, pre + L.LAYER_NORMS["ln1"], init)
        self.ln2 = _layernorm(config, states, pre + L.LAYER_NORMS["ln2"], init)
        rank_h = rank * h // d
        g = generator
        self.u_att = UnmergeMap(n, d, rank, init, g)
        self.m_q, self.m_k, self.m_v = (MergeMap(n, d, rank, init, g) for _ in range(3))
        self.u_o, self.m_o = UnmergeMap(n, d, rank, init, g), MergeMap(n, d, rank, init, g)
        self.u_mlp, self.m_fc1 = UnmergeMap(n, d, rank, init, g), MergeMap(n, h, rank_h, init, g)
        self.u_fc2, self.m_fc2 = UnmergeMap(n, h, rank_h, init, g), MergeMap(n, d, rank, init, g)
        self.act = ACT2FN[config.hidden_act]

    # (U, M) pair wrapping each frozen linear, by the short names of vit_layout.LAYER_LINEARS.
    def maps(self) -> dict[str, tuple[UnmergeMap, MergeMap]]:
        return {"q": (self.u_att, self.m_q), "k": (self.u_att, self.m_k), "v": (self.u_att, self.m_v),
                "o": (self.u_o, self.m_o), "fc1": (self.u_mlp, self.m_fc1), "fc2": (self.u_fc2, self.m_fc2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_sites(x)[0]

    def forward_sites(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's output and its per-model attention / MLP outputs before the merge, each (B, T, N, d):
        the unmerged streams that the inner-feature losses compare with each original's."""
        b, t, d = x.shape
        z = self.u_att(self.ln1(x))
        q = self.m_q(_per_model_linear(z, self.w_q, self.b_q))
        k = self.m_k(_per_model_linear(z, self.w_k, self.b_k))
        v = self.m_v(_per_model_linear(z, self.w_v, self.b_v))
        heads = lambda y: y.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # noqa: E731
        ctx = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # scale 1/sqrt(head_dim)
        ctx = ctx.transpose(1, 2).reshape(b, t, d)
        att = _per_model_linear(self.u_o(ctx), self.w_o, self.b_o)
        x = x + self.m_o(att)
        z = self.u_mlp(self.ln2(x))
        hid = self.act(self.m_fc1(_per_model_linear(z, self.w_fc1, self.b_fc1)))
        mlp = _per_model_linear(self.u_fc2(hid), self.w_fc2, self.b_fc2)
        return x + self.m_fc2(mlp), att, mlp


class SuperNet(nn.Module):
    """FS-Merge SuperNet over N frozen ViTs of one architecture.

    Args:
        models: the N source ``ViTForImageClassification`` (frozen copies of their weights are kept).
        tasks: one task name per model; model i is the expert (and owns the head) of task i.
        rank: rank r of the low-rank part of every width-d map; the MLP-hidden maps get ``r*h/d`` (4r).
            0 gives "FS-Merge diagonal".
        init: ``"first"`` (folds exactly to model 1) or ``"average"`` (folds to the weight average).
        seed: seed of the random (non-zero) low-rank factors.
    """

    def __init__(self, models: Sequence[ViTForImageClassification], tasks: Sequence[str], *, rank: int = 8,
                 init: str = "first", seed: int = 0):
        super().__init__()
        config = validate_models(models, tasks)
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {rank!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.config, self.tasks, self.rank, self.init = config, list(tasks), rank, init
        self.sources = [str(getattr(m.config, "_name_or_path", "") or "") for m in models]
        self.id2labels = [id2label_of(m) for m in models]
        states = [{k: v.detach().float().clone() for k, v in m.state_dict().items()} for m in models]
        n, d = len(models), config.hidden_size
        g = torch.Generator().manual_seed(seed)
        gk = lambda name: L.global_key(name)  # noqa: E731
        self.register_buffer("patch_w", torch.cat([s[gk("patch_weight")] for s in states]))  # (N*d, C, p, p)
        self.register_buffer("patch_b", torch.cat([s[gk("patch_bias")] for s in states]))
        self.register_buffer("cls", torch.stack([s[gk("cls")].reshape(d) for s in states]))  # (N, d)
        self.register_buffer("pos", torch.stack([s[gk("pos")].reshape(-1, d) for s in states], 1))  # (T, N, d)
        self.m_pre = MergeMap(n, d, rank, init, g)
        self.blocks = nn.ModuleList(SuperBlock(config, states, i, rank, init, g)
                                    for i in range(config.num_hidden_layers))
        self.final_ln = _layernorm(config, states, L.ENCODER_PREFIX + L.FINAL_NORM, init)
        self.u_task = UnmergeMap(n, d, rank, init, g)
        heads = [head_state(m) for m in models]
        for i, (w, b) in enumerate(heads):
            self.register_buffer(f"head_w_{i}", w.float())
            self.register_buffer(f"head_b_{i}", b.float())
        for buf in self.buffers():
            buf.requires_grad_(False)
        with torch.device("meta"):  # the stock encoder that runs the folded weights; holds no tensor of its own
            vit = ViTModel(config, add_pooling_layer=False).eval()
        object.__setattr__(self, "_folded_vit", vit)  # not a submodule: no parameters, not saved, never trained

    @property
    def n(self) -> int:
        return len(self.tasks)

    def head(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"head_w_{i}"), getattr(self, f"head_b_{i}")

    def merged_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """f*: the merged CLS feature after the merged final LayerNorm, (B, d)."""
        return self.merged_tokens(pixel_values)[:, 0]

    def merged_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every merged output token after the final LayerNorm, (B, T, d): one stock ViT forward on the folded
        weights (see the module docstring)."""
        state = {k.removeprefix(L.ENCODER_PREFIX): v for k, v in folded_encoder(self).items()}
        return functional_call(self._folded_vit, state, (pixel_values,)).last_hidden_state

    def streamed_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``merged_tokens`` through the N per-model streams (the factored form, no folding): the reference."""
        return self.final_ln(self._stream(pixel_values))

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, d = pixel_values.shape[0], self.config.hidden_size
        patches = F.conv2d(pixel_values, self.patch_w, self.patch_b, stride=self.config.patch_size)
        patches = patches.flatten(2).transpose(1, 2).unflatten(-1, (self.n, d))  # (B, T-1, N, d)
        tokens = torch.cat([self.cls.expand(b, 1, self.n, d), patches], 1) + self.pos
        return self.m_pre(tokens)

    def _stream(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self._embed(pixel_values)
        for block in self.blocks:
            x = block(x)
        return x

    def site_features(self, pixel_values: torch.Tensor, sites: Sequence[str], tokens: str = "cls"
                      ) -> dict[str, torch.Tensor]:
        """The SuperNet's counterpart of ``common.site_features`` for every model at once: each site as
        (B, K, N, d), stream i being what stands in for model i (``"final"``: U_task block i of the merged
        output, at the CLS token or every token; ``"att{l}"``/``"mlp{l}"``: model i's unmerged attention / MLP
        output of block l, every token)."""
        want = set(sites)
        out: dict[str, torch.Tensor] = {}
        if want == {"final"}:  # nothing per-model inside: the folded forward
            h = self.merged_tokens(pixel_values)
            return {"final": self.u_task(h[:, :1] if tokens == "cls" else h)}
        x = self._embed(pixel_values)
        for layer, block in enumerate(self.blocks):
            att_site, mlp_site = f"att{layer}", f"mlp{layer}"
            if att_site in want or mlp_site in want:
                x, att, mlp = block.forward_sites(x)
                if att_site in want:
                    out[att_site] = att
                if mlp_site in want:
                    out[mlp_site] = mlp
            else:
                x = block(x)
        if "final" in want:
            h = self.final_ln(x)
            out["final"] = self.u_task(h[:, :1] if tokens == "cls" else h)
        return {s: out[s] for s in sites}

    def task_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every task's pre-head feature, (B, N, d): block i of U_task applied to f*."""
        return self.u_task(self.merged_feature(pixel_values))

    def forward(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None,
                sites: Sequence[str] | None = None, tokens: str = "cls"):
        """Pre-head feature of each sample's own task (row b uses task ``task_ids[b]``), (B, d); with
        ``sites``, ``site_features`` instead (through ``forward`` so that DDP sees the call)."""
        if sites is not None:
            return self.site_features(pixel_values, sites, tokens)
        feats = self.task_features(pixel_values)
        return feats[torch.arange(feats.shape[0], device=feats.device), task_ids]

    def logits(self, pixel_values: torch.Tensor, task: int) -> torch.Tensor:
        w, b = self.head(task)
        return self.task_features(pixel_values)[:, task] @ w.T + b

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def fold(self):
        """One stock ViT encoder + one head per task (exact). See ``fold.fold_supernet``."""
        return fold_supernet(self)
