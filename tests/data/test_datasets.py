"""load_split: which split is built from which files, checksums, downloads, fallback."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.data import datasets
from batchnorm.data.datasets import (
    DataFallbackWarning,
    default_data_dir,
    load_split,
    mirrors_for,
)
from batchnorm.data.idx import DataFileError

IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


def synthetic(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (count, size, size), dtype=np.uint8),
            rng.integers(0, 10, count, dtype=np.uint8))


def write_part(folder: Path, part: str, images: np.ndarray, labels: np.ndarray,
               write_idx, suffix: str = "") -> None:
    write_idx(folder / f"{IMAGES[part]}{suffix}", images)
    write_idx(folder / f"{LABELS[part]}{suffix}", labels)


def assert_matches(x: torch.Tensor, y: torch.Tensor, images: np.ndarray, labels: np.ndarray):
    """Exact: pixels / 255 in float32, shape (N, 1, H, W), int64 labels."""
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(images), 1, *images.shape[1:])
    expected = torch.from_numpy(images.astype(np.float64) / 255.0).unsqueeze(1)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-7)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_all_four_files_give_train_set_and_test_set_as_validation(tmp_path, write_idx, name):
    train, test = synthetic(12, 5, seed=0), synthetic(7, 5, seed=1)
    write_part(tmp_path / name, "train", *train, write_idx)
    write_part(tmp_path / name, "test", *test, write_idx)
    split = load_split(name, data_dir=tmp_path)
    assert (split.name, split.source, split.note) == (name, str(tmp_path / name), "")
    assert_matches(split.train_x, split.train_y, *train)
    assert_matches(split.val_x, split.val_y, *test)


def test_test_files_alone_split_first_8000_train_last_2000_validation(tmp_path, write_idx):
    images, labels = synthetic(10_000, 2, seed=2)
    write_part(tmp_path / "mnist", "test", images, labels, write_idx)
    split = load_split("mnist", data_dir=tmp_path)
    assert split.name == "mnist-test-split" and "8000" in split.note
    assert_matches(split.train_x, split.train_y, images[:8000], labels[:8000])
    assert_matches(split.val_x, split.val_y, images[8000:], labels[8000:])


def test_data_dir_may_point_straight_at_the_files(tmp_path, write_idx):
    images, labels = synthetic(10_000, 2, seed=13)
    write_part(tmp_path, "test", images, labels, write_idx)
    split = load_split("mnist", data_dir=tmp_path)
    assert (split.name, split.source) == ("mnist-test-split", str(tmp_path))
    assert_matches(split.val_x, split.val_y, images[8000:], labels[8000:])


def test_too_few_test_images_for_the_split_is_an_error(tmp_path, write_idx):
    write_part(tmp_path / "mnist", "test", *synthetic(8000, 2, seed=3), write_idx)
    with pytest.raises(DataFileError, match="too few test images"):
        load_split("mnist", data_dir=tmp_path)


def test_official_gz_files_are_checked_against_the_published_md5(tmp_path, write_idx):
    write_part(tmp_path / "mnist", "test", *synthetic(10_000, 2, seed=4), write_idx, ".gz")
    with pytest.raises(DataFileError, match="MD5 checksum mismatch") as caught:
        load_split("mnist", data_dir=tmp_path)
    assert caught.value.expected == datasets.DATASETS["mnist"].md5["t10k-images-idx3-ubyte.gz"]
    assert Path(caught.value.path).name == "t10k-images-idx3-ubyte.gz"


def test_corrupt_file_raises_instead_of_falling_back(tmp_path, write_idx):
    write_part(tmp_path / "mnist", "test", *synthetic(10_000, 2, seed=5), write_idx)
    images = tmp_path / "mnist" / IMAGES["test"]
    images.write_bytes(images.read_bytes()[:-1])
    with pytest.raises(DataFileError, match="truncated data"):
        load_split("mnist", data_dir=tmp_path, fallback=True)


def test_half_a_pair_of_files_names_the_missing_file(tmp_path, write_idx):
    write_idx(tmp_path / "mnist" / IMAGES["test"], np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_split("mnist", data_dir=tmp_path)


def test_label_count_differing_from_image_count_is_an_error(tmp_path, write_idx):
    images, labels = synthetic(10_001, 2, seed=6)
    write_part(tmp_path / "mnist", "test", images, labels[:-1], write_idx)
    with pytest.raises(DataFileError, match="label count") as caught:
        load_split("mnist", data_dir=tmp_path)
    assert (caught.value.actual, caught.value.expected.split()[0]) == (10_000, "10001")


def test_label_outside_0_to_9_is_an_error(tmp_path, write_idx):
    images, labels = synthetic(10_000, 2, seed=7)
    labels[17] = 10
    write_part(tmp_path / "mnist", "test", images, labels, write_idx)
    with pytest.raises(DataFileError, match="label out of range"):
        load_split("mnist", data_dir=tmp_path)


def test_missing_data_falls_back_to_sklearn_digits_and_says_so(tmp_path):
    from sklearn.datasets import load_digits

    with pytest.warns(DataFallbackWarning, match="fell back to scikit-learn") as caught:
        split = load_split("mnist", data_dir=tmp_path)
    assert split.name == "digits" and split.source == "sklearn bundled digits"
    assert split.note == str(caught[0].message) and str(tmp_path / "mnist") in split.note
    digits = load_digits()
    expected = torch.from_numpy(digits.images / 16.0).unsqueeze(1)
    x = torch.cat([split.train_x, split.val_x]).double()
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)
    assert torch.equal(torch.cat([split.train_y, split.val_y]), torch.from_numpy(digits.target))
    assert (len(split.train_x), len(split.val_x)) == (1437, 360)


def test_digits_by_name_loads_without_warning_or_note():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = load_split("digits")
    assert (split.name, split.note, split.train_x.shape[1:]) == ("digits", "", (1, 8, 8))


def test_missing_data_without_fallback_raises_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz") as caught:
        load_split("fashion-mnist", data_dir=tmp_path, fallback=False)
    assert str(tmp_path / "fashion-mnist") in str(caught.value)


def test_unknown_name_is_a_value_error_naming_argument_and_choices():
    with pytest.raises(ValueError, match=r"name must be one of mnist, fashion-mnist, digits, "
                                         r"got 'cifar10'"):
        load_split("cifar10")


def test_default_data_dir_is_env_then_given_default_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BATCHNORM_DATA", raising=False)
    assert default_data_dir() == tmp_path / "home" / ".cache" / "batchnorm"
    assert default_data_dir(default=tmp_path / "repo-data") == tmp_path / "repo-data"
    monkeypatch.setenv("BATCHNORM_DATA", str(tmp_path / "env"))
    assert default_data_dir(default=tmp_path / "repo-data") == tmp_path / "env"


def test_load_split_reads_from_batchnorm_data_when_no_data_dir(monkeypatch, tmp_path, write_idx):
    write_part(tmp_path / "mnist", "test", *synthetic(10_000, 2, seed=8), write_idx)
    monkeypatch.setenv("BATCHNORM_DATA", str(tmp_path))
    assert load_split("mnist").source == str(tmp_path / "mnist")


def test_mirror_env_var_overrides_the_builtin_mirrors(monkeypatch):
    monkeypatch.delenv("BATCHNORM_MNIST_MIRRORS", raising=False)
    assert mirrors_for("mnist") == datasets.DATASETS["mnist"].mirrors
    monkeypatch.setenv("BATCHNORM_MNIST_MIRRORS", " http://a/mnist/ , http://b/ ")
    assert mirrors_for("mnist") == ("http://a/mnist/", "http://b/")
    assert mirrors_for("fashion-mnist") == datasets.DATASETS["fashion-mnist"].mirrors


def test_download_fetches_missing_files_then_loads_them(tmp_path, server, monkeypatch,
                                                         serve_mnist):
    train, test = synthetic(12, 4, seed=9), synthetic(5, 4, seed=10)
    serve_mnist({"train": train, "test": test})
    monkeypatch.setenv("BATCHNORM_MNIST_MIRRORS", f"{server.url}/mnist/")
    split = load_split("mnist", data_dir=tmp_path, download=True)
    assert split.name == "mnist"
    assert_matches(split.train_x, split.train_y, *train)
    assert_matches(split.val_x, split.val_y, *test)
    assert sorted(path.name for path in (tmp_path / "mnist").iterdir()) == sorted(
        datasets.DATASETS["mnist"].md5)


def test_download_skips_files_already_present(tmp_path, server, write_idx, serve_mnist):
    train, test = synthetic(12, 4, seed=11), synthetic(5, 4, seed=12)
    serve_mnist({"train": train, "test": test})
    write_part(tmp_path / "mnist", "test", *test, write_idx)  # raw test files already here
    load_split("mnist", data_dir=tmp_path, download=True, mirrors=[f"{server.url}/mnist/"])
    hits = {path: route.hits for path, route in server.routes.items()}
    assert hits == {f"/mnist/{IMAGES['train']}.gz": 1, f"/mnist/{LABELS['train']}.gz": 1,
                    f"/mnist/{IMAGES['test']}.gz": 0, f"/mnist/{LABELS['test']}.gz": 0}


def test_failed_download_falls_back_to_digits(tmp_path, server):
    with pytest.warns(DataFallbackWarning):
        split = load_split("mnist", data_dir=tmp_path, download=True,
                           mirrors=[f"{server.url}/nothing-here/"])
    assert split.name == "digits"
    assert not any((tmp_path / "mnist").iterdir())


def test_without_network_the_download_tries_each_mirror_once_then_falls_back(
        tmp_path, monkeypatch, no_network):
    mirrors = ["https://one.example/", "https://two.example/", "https://three.example/"]
    with pytest.warns(DataFallbackWarning):
        split = load_split("mnist", data_dir=tmp_path, download=True, mirrors=mirrors)
    assert split.name == "digits"
    assert no_network == [f"{mirror}t10k-images-idx3-ubyte.gz" for mirror in mirrors]


@pytest.mark.mnist
def test_real_mnist_test_set_gives_the_documented_8000_2000_split(mnist_data_dir):
    split = load_split("mnist", data_dir=mnist_data_dir, fallback=False)
    assert split.name in ("mnist-test-split", "mnist")
    if split.name == "mnist-test-split":
        folder = mnist_data_dir / "mnist"
        with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as handle:
            images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as handle:
            labels = np.frombuffer(handle.read(), np.uint8, offset=8)
        assert_matches(split.train_x, split.train_y, images[:8000], labels[:8000])
        assert_matches(split.val_x, split.val_y, images[8000:], labels[8000:])
    else:
        assert (len(split.train_x), len(split.val_x)) == (60_000, 10_000)
