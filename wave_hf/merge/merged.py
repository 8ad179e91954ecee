"""Results of a merge: ``MergedViT`` (one encoder + one head per task) and ``EnsembleViT`` (N originals).

On-disk layout written by ``save_pretrained(dir)`` (atomically: a temp dir next to ``dir``, then rename)::

    dir/merge_config.json        method, tasks, source models, whether it is a single model, metadata
    dir/README.md                model card (``model_cards/merge_card.md``), base_model = the sources
    dir/<task>/                  a plain ``ViTForImageClassification`` folder per task (config.json +
                                 model.safetensors); load it with transformers alone, no wave-hf import.

For a ``MergedViT`` every ``dir/<task>`` holds the same encoder weights and its own classifier head.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from .. import vit_layout as L
from ..io import atomic_dir, push_folder

CONFIG_NAME = "merge_config.json"
FORMAT = "wave-hf-merge"
FORMAT_VERSION = 1
CARD_TAGS = ["wave-hf", "merge", "fs-merge", "vit"]

_DEFAULT_CARD = """---
{{ card_data }}
---

# {{ title }}

Merged with wave-hf ({{ method }}). Tasks: {{ tasks | join(", ") }}.
"""


def _card_template() -> str:
    """``model_cards/merge_card.md`` from the repo root (or packaged), else a minimal built-in template."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "model_cards" / "merge_card.md", here.parents[1] / "model_cards" / "merge_card.md"):
        if cand.is_file():
            return cand.read_text()
    return _DEFAULT_CARD


def _task_config(config: ViTConfig, id2label: dict[int, str]) -> ViTConfig:
    cfg = copy.deepcopy(config)
    cfg.id2label = {int(k): str(v) for k, v in id2label.items()}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    cfg.architectures = ["ViTForImageClassification"]
    cfg._name_or_path = ""
    return cfg


class _MultiTaskResult:
    """Shared save/load/card/joint-prediction logic."""

    is_single_model: bool = True
    method: str = "?"

    tasks: list[str]
    id2label: dict[str, dict[int, str]]
    sources: list[str]
    metadata: dict

    # -- to implement -------------------------------------------------------------------------------
    def for_task(self, task: str) -> ViTForImageClassification:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, pixel_values: torch.Tensor, task: str) -> torch.Tensor:
        model = self._model(task)
        with torch.no_grad():
            return model(pixel_values=pixel_values).logits

    # -- shared -------------------------------------------------------------------------------------
    def _check_task(self, task: str) -> int:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this merge has tasks {self.tasks}")
        return self.tasks.index(task)

    def _model(self, task: str) -> ViTForImageClassification:
        cache = self.__dict__.setdefault("_models", {})
        if task not in cache:
            cache[task] = self.for_task(task).eval()
        return cache[task]

    def all_logits(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return [self.logits(pixel_values, t) for t in self.tasks]

    def predict_joint(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Task-agnostic prediction: argmax over all heads' concatenated logits.

        Returns ``(task_index, label)`` per image: which head won and its class index.
        """
        logits = self.all_logits(pixel_values)
        sizes = torch.tensor([x.shape[-1] for x in logits])
        flat = torch.cat(logits, -1).argmax(-1)
        starts = torch.cumsum(sizes, 0) - sizes
        task = torch.bucketize(flat, torch.cumsum(sizes, 0), right=True)
        return task, flat - starts[task]

    def merge_config(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "single_model": self.is_single_model,
            "tasks": list(self.tasks),
            "sources": list(self.sources),
            "layout": {t: f"{t}/" for t in self.tasks},
            "metadata": self.metadata,
        }

    def model_card(self, accuracies: dict[str, float] | None = None):
        from huggingface_hub import EvalResult, ModelCard, ModelCardData

        accuracies = accuracies or self.metadata.get("accuracies") or {}
        name = f"wave-hf-{self.method}-" + "-".join(self.tasks)
        evals = [
            EvalResult(task_type="image-classification", dataset_type=t, dataset_name=t, metric_type="accuracy",
                       metric_value=float(accuracies[t]))
            for t in self.tasks if t in accuracies
        ]
        data = ModelCardData(
            library_name="wave-hf",
            base_model=[s for s in self.sources if s] or None,
            tags=list(CARD_TAGS),
            pipeline_tag="image-classification",
            model_name=name if evals else None,
            eval_results=evals or None,
        )
        return ModelCard.from_template(
            data,
            template_str=_card_template(),
            title=name,
            method=self.method,
            single_model=self.is_single_model,
            tasks=list(self.tasks),
            sources=list(self.sources),
            accuracies={t: accuracies[t] for t in self.tasks if t in accuracies},
            metadata=self.metadata,
            num_labels={t: len(self.id2label[t]) for t in self.tasks},
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *, accuracies: dict[str, float] | None = None,
                        safe_serialization: bool = True) -> Path:
        """Write the documented layout atomically; an existing ``save_directory`` is replaced only on success."""
        target = Path(save_directory).resolve()
        with atomic_dir(target) as tmp:
            for task in self.tasks:
                self.for_task(task).save_pretrained(tmp / task, safe_serialization=safe_serialization)
            cfg = self.merge_config()
            if accuracies:
                cfg["metadata"] = {**cfg["metadata"], "accuracies": dict(accuracies)}
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
            self.model_card(accuracies).save(tmp / "README.md")
        return target

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload merged ViT (wave-hf)", accuracies: dict | None = None):
        return push_folder(lambda folder: self.save_pretrained(folder, accuracies=accuracies), repo_id,
                           commit_message=commit_message, private=private, token=token)

    @staticmethod
    def from_pretrained(directory: str | os.PathLike):
        """Load a folder written by ``save_pretrained`` (a ``MergedViT`` or an ``EnsembleViT``)."""
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: not a wave-hf merge folder")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
        models = []
        for task in cfg["tasks"]:
            if not (directory / task).is_dir():
                raise FileNotFoundError(f"{directory / task} missing: the merge config lists task {task!r}")
            models.append(ViTForImageClassification.from_pretrained(directory / task))
        meta = cfg.get("metadata", {})
        if not cfg.get("single_model", True):
            return EnsembleViT(models, cfg["tasks"], sources=cfg.get("sources"), metadata=meta)
        from .common import encoder_state, head_state, id2label_of

        return MergedViT(
            config=models[0].config,
            encoder_state=encoder_state(models[0]),
            heads={t: head_state(m) for t, m in zip(cfg["tasks"], models)},
            id2label={t: id2label_of(m) for t, m in zip(cfg["tasks"], models)},
            sources=cfg.get("sources", []),
            method=cfg.get("method", "?"),
            metadata=meta,
        )


class MergedViT(_MultiTaskResult):
    """ONE stock ViT encoder (``encoder_state``, keys as in ``vit_layout``) plus one head per task.

    ``for_task(name)`` returns a plain ``ViTForImageClassification`` (the shared encoder + that task's head).
    """

    is_single_model = True

    def __init__(self, *, config: ViTConfig, encoder_state: dict[str, torch.Tensor],
                 heads: dict[str, tuple[torch.Tensor, torch.Tensor]], id2label: dict[str, dict[int, str]],
                 sources: Sequence[str] = (), method: str = "?", metadata: dict | None = None):
        self.config = config
        # Held on the CPU whatever device trained it, like a model fresh from ``from_pretrained``.
        self.encoder_state = {k: v.detach().cpu() for k, v in encoder_state.items()}
        self.heads = {t: (w.detach().cpu(), b.detach().cpu()) for t, (w, b) in heads.items()}
        self.tasks = list(heads)
        self.id2label = id2label
        self.sources = list(sources)
        self.method = method
        self.metadata = dict(metadata or {})
        missing = set(L.encoder_keys(config.num_hidden_layers)) - set(encoder_state)
        if missing:
            raise ValueError(f"encoder_state is missing {len(missing)} keys, e.g. {sorted(missing)[:3]}")

    def for_task(self, task: str) -> ViTForImageClassification:
        self._check_task(task)
        model = L.empty_classifier(_task_config(self.config, self.id2label[task]))
        w, b = self.heads[task]
        sd = {k: v.detach().clone() for k, v in self.encoder_state.items()}
        sd.update(dict(zip(L.classifier_keys(), (w.detach().clone(), b.detach().clone()))))
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The shared pre-head feature (CLS after the final LayerNorm), (B, d)."""
        enc = L.encoder(self._model(self.tasks[0]))
        with torch.no_grad():
            return enc(pixel_values=pixel_values).last_hidden_state[:, 0]

    def all_logits(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(pixel_values)  # one encoder pass for every head
        return [f @ self.heads[t][0].T + self.heads[t][1] for t in self.tasks]

    def logits(self, pixel_values: torch.Tensor, task: str) -> torch.Tensor:
        self._check_task(task)
        w, b = self.heads[task]
        return self.features(pixel_values) @ w.T + b

    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.encoder_state.values()) + sum(
            w.numel() + b.numel() for w, b in self.heads.values())

    def __repr__(self) -> str:
        c = self.config
        return (f"MergedViT(method={self.method!r}, tasks={self.tasks}, depth={c.num_hidden_layers}, "
                f"width={c.hidden_size}, heads={c.num_attention_heads})")


class EnsembleViT(_MultiTaskResult):
    """The N original models side by side (the upper bound). NOT a single model: it cannot be folded;
    ``for_task(name)`` returns the original expert of that task and ``predict_joint`` runs all N."""

    is_single_model = False
    method = "ensemble"

    def __init__(self, models: Sequence[ViTForImageClassification], tasks: Sequence[str], *,
                 sources: Sequence[str] | None = None, metadata: dict | None = None):
        from .common import id2label_of, model_source

        self.models = dict(zip(tasks, models))
        self.tasks = list(tasks)
        self.id2label = {t: id2label_of(m) for t, m in self.models.items()}
        self.sources = list(sources) if sources is not None else [model_source(m) for m in models]
        self.metadata = dict(metadata or {})

    def for_task(self, task: str) -> ViTForImageClassification:
        self._check_task(task)
        return self.models[task].eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.models.values() for p in m.parameters())

    def __repr__(self) -> str:
        return f"EnsembleViT(tasks={self.tasks}, single_model=False)"
