"""Results of a merge: ``MergedViT`` (one encoder + one head per task) and ``EnsembleViT`` (N originals).

On-disk layout written by ``save_pretrained(dir)`` (atomically: a temp dir next to ``dir``, then rename)::

    dir/merge_config.json        method, tasks, source models, whether it is a single model, metadata
    dir/README.md                model card (``wave_hf/model_cards/merge_card.md``), base_model = the sources
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

from .. import cards
from .. import vit_layout as L
from ..export import image_processor
from ..io import HubMixin, require_finite
from ..validation import check_id2label, check_tensors, check_unique_names
from .common import encoder_state, head_state, id2label_of, model_source, validate_models

CONFIG_NAME = "merge_config.json"
FORMAT = "wave-hf-merge"
FORMAT_VERSION = 1
CARD_TAGS = ["wave-hf", "merge", "fs-merge", "vit"]

def _task_config(config: ViTConfig, id2label: dict[int, str]) -> ViTConfig:
    cfg = copy.deepcopy(config)
    cfg.id2label = {int(k): str(v) for k, v in id2label.items()}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    cfg.architectures = ["ViTForImageClassification"]
    cfg._name_or_path = ""
    return cfg


class _MultiTaskResult(HubMixin, library_name="wave-hf", tags=list(CARD_TAGS),
                       repo_url="https://arxiv.org/abs/2410.01483"):
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
            base_model=cards.repo_ids(list(self.sources), "base_model"),
            tags=list(CARD_TAGS),
            pipeline_tag="image-classification",
            model_name=name if evals else None,
            eval_results=evals or None,
        )
        return ModelCard.from_template(
            data,
            template_path=str(cards.template_path("merge_card.md")),
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
                        **kwargs) -> Path:
        """Write the documented layout; files are published one atomic rename each, other files are kept.

        ``accuracies`` (task -> accuracy) are recorded in ``merge_config.json`` and the card's model-index.
        Other keywords are ``HubMixin.save_pretrained``'s (``push_to_hub=True``, ``repo_id``, ...).
        """
        if accuracies:
            self.metadata = {**self.metadata, "accuracies": {str(k): float(v) for k, v in accuracies.items()}}
        super().save_pretrained(save_directory, **kwargs)
        return Path(save_directory).resolve()

    def _save_pretrained(self, save_directory: Path) -> None:
        check_unique_names(self.tasks, "task name")  # they become folder names; ``tasks`` may have been edited
        for task in self.tasks:  # a failure leaves only the staging folder, which publish_dir removes
            model = self.for_task(task)
            require_finite(model.state_dict().items(), f"the merged model of task {task!r}")
            model.save_pretrained(save_directory / task)
            if model.config.num_channels == 3:  # RGB task folders run in pipeline() as they are
                image_processor(model.config.image_size).save_pretrained(save_directory / task)
        cfg = self.merge_config()
        (save_directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        self.model_card().save(save_directory / "README.md")

    def push_to_hub(self, repo_id: str, *, accuracies: dict[str, float] | None = None, **kwargs):
        """Upload the folder in one commit (``ModelHubMixin.push_to_hub``: ``branch``, ``create_pr``, ...)."""
        if accuracies:
            self.metadata = {**self.metadata, "accuracies": {str(k): float(v) for k, v in accuracies.items()}}
        kwargs.setdefault("commit_message", "Upload merged ViT (wave-hf)")
        return super().push_to_hub(repo_id, **kwargs)

    @classmethod
    def _from_folder(cls, folder: Path, name: str, **kwargs):
        """Load a folder written by ``save_pretrained`` (a ``MergedViT`` or an ``EnsembleViT``).

        ``merge_config.json`` is untrusted: it is validated (``read_merge_config``) before any task folder is
        opened, so a task name like ``../x`` or ``/etc`` never becomes a path.
        """
        if kwargs:
            raise TypeError(f"from_pretrained got unknown arguments {sorted(kwargs)}")
        directory = folder
        cfg = read_merge_config(directory / CONFIG_NAME)
        tasks = cfg["tasks"]
        models = []
        for task in tasks:
            if not (directory / task).is_dir():
                raise FileNotFoundError(f"{directory / task} missing: the merge config lists task {task!r}")
            models.append(ViTForImageClassification.from_pretrained(directory / task))
        meta = cfg.get("metadata", {})
        if not cfg.get("single_model", True):
            return EnsembleViT(models, tasks, sources=cfg.get("sources"), metadata=meta)

        if len(models) > 1:
            validate_models(models, tasks)  # the task folders must share one architecture
        return MergedViT(
            config=models[0].config,
            encoder_state=encoder_state(models[0]),
            heads={t: head_state(m) for t, m in zip(tasks, models)},
            id2label={t: id2label_of(m) for t, m in zip(tasks, models)},
            sources=cfg.get("sources", []),
            method=cfg.get("method", "?"),
            metadata=meta,
        )


#: ``merge_config.json`` keys: the JSON types accepted and how a message describes them.
_CONFIG_KEYS = {
    "format": (str, "a string"),
    "format_version": (int, "an integer"),
    "method": (str, "a string"),
    "single_model": (bool, "true or false"),
    "tasks": (list, "a list of task names"),
    "sources": (list, "a list of strings"),
    "layout": (dict, "an object"),
    "metadata": (dict, "an object"),
}


def read_merge_config(path: Path) -> dict:
    """``merge_config.json`` parsed and validated: a JSON object, every known key of the right type, the
    format and version this code writes, and task names that are safe folder names (``check_name``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a wave-hf merge folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object {{...}}, got {type(cfg).__name__}")
    for key in ("format", "tasks"):
        if key not in cfg:
            raise ValueError(f"{path} has no key {key!r}: not a folder written by wave-hf's merge")
    for key, (kind, text) in _CONFIG_KEYS.items():
        value = cfg.get(key)
        if key in cfg and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ValueError(f"{path}: key {key!r} must be {text}, got {value!r}")
    if cfg["format"] != FORMAT:
        raise ValueError(f"{path}: key 'format' is {cfg['format']!r}, expected {FORMAT!r}")
    if cfg.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{path}: key 'format_version' is {cfg['format_version']}; this wave-hf reads up to "
                         f"{FORMAT_VERSION} (upgrade wave-hf)")
    if not all(isinstance(s, str) for s in cfg.get("sources", [])):
        raise ValueError(f"{path}: key 'sources' must be a list of strings, got {cfg['sources']!r}")
    try:
        cfg["tasks"] = check_unique_names(cfg["tasks"], "task name")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: key 'tasks': {err}") from None
    if not cfg["tasks"]:
        raise ValueError(f"{path}: key 'tasks' is empty; a merge has one task folder per task")
    return cfg


class MergedViT(_MultiTaskResult):
    """ONE stock ViT encoder (``encoder_state``, keys as in ``vit_layout``) plus one head per task.

    ``for_task(name)`` returns a plain ``ViTForImageClassification`` (the shared encoder + that task's head).
    """

    is_single_model = True

    def __init__(self, *, config: ViTConfig, encoder_state: dict[str, torch.Tensor],
                 heads: dict[str, tuple[torch.Tensor, torch.Tensor]], id2label: dict[str, dict[int, str]],
                 sources: Sequence[str] = (), method: str = "?", metadata: dict | None = None):
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig, got {type(config).__name__}")
        if not isinstance(heads, dict) or not heads:
            raise TypeError(f"heads must be a non-empty dict {{task: (weight, bias)}}, got "
                            f"{heads if isinstance(heads, dict) else type(heads).__name__}")
        if not isinstance(id2label, dict):
            raise TypeError(f"id2label must be a dict {{task: {{id: label}}}}, got {type(id2label).__name__}")
        self.tasks = check_unique_names(heads, "task name")  # task names become folder names when saved
        _check_str_list(sources, "sources")
        if not isinstance(method, str):
            raise TypeError(f"method must be a string, got {method!r}")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        shapes = L.tensor_shapes(L.shape_of(config))
        check_tensors(encoder_state, shapes, "encoder_state")
        self.id2label = {}
        for task, head in heads.items():
            if task not in id2label:
                raise ValueError(f"id2label has no labels for task {task!r}; it has {sorted(id2label)}")
            labels = check_id2label(id2label[task], f"id2label[{task!r}]")
            n = len(labels)
            if not (isinstance(head, (tuple, list)) and len(head) == 2):
                raise TypeError(f"heads[{task!r}] must be a (weight, bias) pair of tensors, got {type(head).__name__}")
            check_tensors(dict(zip(L.classifier_keys(), head)), dict(zip(L.classifier_keys(),
                                                                            ((n, config.hidden_size), (n,)))),
                           f"heads[{task!r}]")
            self.id2label[task] = labels
        self.config = config
        # Held on the CPU whatever device trained it, like a model fresh from ``from_pretrained``.
        self.encoder_state = {k: v.detach().cpu() for k, v in encoder_state.items()}
        self.heads = {t: (w.detach().cpu(), b.detach().cpu()) for t, (w, b) in heads.items()}
        self.sources = list(sources)
        self.method = method
        self.metadata = dict(metadata or {})

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

        if isinstance(models, ViTForImageClassification) or not isinstance(models, Sequence):
            raise TypeError(f"models must be a list of ViTForImageClassification, got {type(models).__name__}")
        for i, m in enumerate(models):
            if not isinstance(m, ViTForImageClassification):
                raise TypeError(f"models[{i}] must be a ViTForImageClassification, got {type(m).__name__}")
        tasks = check_unique_names(tasks, "task name")  # task names become folder names when saved
        if len(tasks) != len(models) or not tasks:
            raise ValueError(f"got {len(models)} models but {len(tasks)} task names; give one task name per model")
        if sources is not None:
            _check_str_list(sources, "sources")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        self.models = dict(zip(tasks, models))
        self.tasks = tasks
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


def _check_str_list(values: object, name: str) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not all(
            isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a list of strings, got {values!r}")


def from_encoder(models, tasks, state) -> MergedViT:
    """A ``MergedViT`` from one encoder state and each source model's own head."""
    return MergedViT(config=models[0].config, encoder_state=state,
                     heads={t: head_state(m) for t, m in zip(tasks, models)},
                     id2label={t: id2label_of(m) for t, m in zip(tasks, models)})
