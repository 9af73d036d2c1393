"""Train/validation splits of MNIST, Fashion-MNIST, or scikit-learn's 8x8 digits.

Files live under ``<data_dir>/<dataset>/`` (or directly in ``data_dir``) with their
official names (``.gz`` or raw).
Which split you get depends on what is there:

* all four files -> train = the 60,000 training images, validation = the 10,000 test images;
* only the two test files -> train = the first 8,000 test images, validation = the last
  2,000 (``"<dataset>-test-split"``);
* nothing (and no download, or the download failed) -> with ``fallback=True``, the 1,797
  scikit-learn digits: train = the first 1,437, validation = the last 360 (80/20 in file
  order), announced by :class:`DataFallbackWarning` and ``Split.note``.

Official ``.gz`` files are checked against their published MD5s; raw files, which have
no published checksum, are checked by their IDX structure alone.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from batchnorm.data.download import DownloadError, download_file, verify_md5
from batchnorm.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataFileError, read_idx

__all__ = ["DATASETS", "DEFAULT_DOWNLOAD_DEADLINE", "DataFallbackWarning", "IdxDataset",
           "Split", "default_data_dir", "download_missing", "load_requested_split", "load_split",
           "mirrors_for"]

logger = logging.getLogger(__name__)

DEFAULT_DOWNLOAD_DEADLINE = 120.0  # seconds for all of a dataset's missing files together
TEST_SPLIT_TRAIN = 8_000  # first 8,000 of the 10,000 test images train, the rest validate
DIGITS_TRAIN = 1_437  # first 80% of scikit-learn's 1,797 digits train, the rest validate
NUM_CLASSES = 10


@dataclass(frozen=True)
class IdxDataset:
    """Where an IDX dataset lives: its folder, its official files with MD5s, its mirrors."""

    folder: str
    md5: dict[str, str]
    mirrors: tuple[str, ...]

    @property
    def env_var(self) -> str:
        """Environment variable overriding ``mirrors``: comma-separated base URLs."""
        return f"BATCHNORM_{self.folder.upper().replace('-', '_')}_MIRRORS"


# Published MD5s of the official .gz files (the same ones torchvision checks).
DATASETS = {
    "mnist": IdxDataset(
        folder="mnist",
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"),
    ),
    "fashion-mnist": IdxDataset(
        folder="fashion-mnist",
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/"
                 "data/fashion/"),
    ),
}
_PARTS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
NAMES = (*DATASETS, "digits")


class DataFallbackWarning(UserWarning):
    """The requested dataset was not available and another one was loaded instead."""


@dataclass(frozen=True)
class Split:
    """Images ``(N, 1, H, W)`` float32 in [0, 1] and int64 labels, for training and validation.

    ``name`` is what was actually loaded (e.g. ``"mnist-test-split"``), ``source`` where
    it came from, ``note`` anything the caller should tell the user (e.g. a fallback).
    """

    train_x: Tensor = field(repr=False)
    train_y: Tensor = field(repr=False)
    val_x: Tensor = field(repr=False)
    val_y: Tensor = field(repr=False)
    name: str
    source: str
    note: str = ""


def default_data_dir(default: str | os.PathLike[str] | None = None) -> Path:
    """``$BATCHNORM_DATA`` if set, else ``default``, else ``~/.cache/batchnorm`` (where
    ``batchnorm data fetch`` downloads to and every command looks)."""
    if os.environ.get("BATCHNORM_DATA"):
        return Path(os.environ["BATCHNORM_DATA"]).expanduser()
    if default is not None:
        return Path(default)
    return Path.home() / ".cache" / "batchnorm"


def mirrors_for(name: str) -> tuple[str, ...]:
    """The dataset's mirrors, overridden by its ``BATCHNORM_<NAME>_MIRRORS`` variable."""
    dataset = DATASETS[name]
    override = os.environ.get(dataset.env_var, "")
    urls = tuple(url.strip() for url in override.split(",") if url.strip())
    return urls or dataset.mirrors


def _find(folder: Path, gz_name: str) -> Path | None:
    """The file under its official ``.gz`` name, else its raw (uncompressed) name."""
    for candidate in (folder / gz_name, folder / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _dataset_folder(root: Path, name: str) -> Path:
    """``root/<dataset folder>``, or ``root`` itself when it directly holds the test files."""
    folder = root / DATASETS[name].folder
    if not folder.is_dir() and _find(root, _PARTS["test"][0]) is not None:
        return root
    return folder


def _load_pair(dataset: IdxDataset, images: Path, labels: Path) -> tuple[Tensor, Tensor]:
    for path in (images, labels):
        if path.suffix == ".gz":
            verify_md5(path, dataset.md5[path.name])
    pixels = read_idx(images, magic=IMAGES_MAGIC)
    targets = read_idx(labels, magic=LABELS_MAGIC)
    if len(pixels) != len(targets):
        raise DataFileError(labels, "label count differs from the image count",
                            f"{len(pixels)} labels (as in {images.name})", len(targets))
    if targets.size and targets.max() >= NUM_CLASSES:
        raise DataFileError(labels, "label out of range", f"labels in [0, {NUM_CLASSES - 1}]",
                            int(targets.max()))
    x = torch.from_numpy(pixels).unsqueeze(1).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(targets.astype(np.int64))


def _present_parts(dataset: IdxDataset, folder: Path) -> dict[str, tuple[Path, Path]]:
    """Parts ("train"/"test") whose two files are both present; half a pair is an error."""
    present = {}
    for part, names in _PARTS.items():
        found = [_find(folder, name) for name in names]
        if all(found):
            present[part] = (found[0], found[1])
        elif any(found):
            missing = names[found.index(None)]
            raise FileNotFoundError(f"{folder}: found half of the {part} files: expected "
                                    f"{missing} (or its raw form) next to the other one")
    return present


def download_missing(name: str, folder: Path, mirrors: tuple[str, ...],
                     deadline_seconds: float = DEFAULT_DOWNLOAD_DEADLINE) -> list[Path]:
    """Download the files of ``name`` missing from ``folder``, all within one deadline,
    the test files first (alone they already give a split), and return the paths
    downloaded. The first file no mirror delivers raises :class:`DownloadError` and ends
    the attempt: the others would fail the same way."""
    deadline = time.monotonic() + deadline_seconds
    files = sorted(DATASETS[name].md5.items(), key=lambda item: item[0] not in _PARTS["test"])
    return [download_file(folder / gz_name, mirrors, md5, deadline=deadline)
            for gz_name, md5 in files if _find(folder, gz_name) is None]


def _digits(note: str) -> Split:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ModuleNotFoundError(
            f"{note}; the scikit-learn digits fallback needs scikit-learn "
            "(pip install 'batchnorm[experiments]')") from None
    digits = load_digits()
    x = torch.from_numpy(digits.images).to(torch.float32).div_(16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return Split(x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], x[DIGITS_TRAIN:], y[DIGITS_TRAIN:],
                 name="digits", source="sklearn bundled digits", note=note)


def load_split(name: str = "mnist", data_dir: str | os.PathLike[str] | None = None,
               download: bool = False, fallback: bool = True,
               mirrors: Sequence[str] | None = None,
               download_deadline: float = DEFAULT_DOWNLOAD_DEADLINE) -> Split:
    """Load ``name`` ("mnist", "fashion-mnist" or "digits") as a train/validation :class:`Split`.

    ``data_dir`` (default :func:`default_data_dir`) holds ``<dataset>/``, or is itself the
    folder with the files. With ``download=True`` missing files are fetched from
    ``mirrors`` (default :func:`mirrors_for`) first, all within ``download_deadline``
    seconds. Corrupt files always raise :class:`DataFileError`; only *absent* data falls
    back to digits.
    """
    if name not in NAMES:
        raise ValueError(f"name must be one of {', '.join(NAMES)}, got {name!r}")
    if name == "digits":
        return _digits(note="")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    folder = _dataset_folder(root, name)
    if download:
        try:
            download_missing(name, folder, tuple(mirrors) if mirrors else mirrors_for(name),
                             download_deadline)
        except DownloadError as error:
            logger.warning("%s", error)
    parts = _present_parts(DATASETS[name], folder)
    if "train" in parts and "test" in parts:
        train_x, train_y = _load_pair(DATASETS[name], *parts["train"])
        val_x, val_y = _load_pair(DATASETS[name], *parts["test"])
        return Split(train_x, train_y, val_x, val_y, name=name, source=str(folder))
    if "test" in parts:
        x, y = _load_pair(DATASETS[name], *parts["test"])
        if len(x) <= TEST_SPLIT_TRAIN:
            raise DataFileError(parts["test"][0], "too few test images for the test split",
                                f"more than {TEST_SPLIT_TRAIN}", len(x))
        return Split(x[:TEST_SPLIT_TRAIN], y[:TEST_SPLIT_TRAIN], x[TEST_SPLIT_TRAIN:],
                     y[TEST_SPLIT_TRAIN:], name=f"{name}-test-split", source=str(folder),
                     note=f"only the {name} test set was found; first {TEST_SPLIT_TRAIN} test "
                          "images train, the rest validate")
    expected = ", ".join(_PARTS["test"])
    if not fallback:
        raise FileNotFoundError(f"{name} not found under {folder}: expected at least "
                                f"{expected} (gzip or raw)")
    note = (f"{name} not found under {folder} (expected at least {expected}); "
            "fell back to scikit-learn's bundled 8x8 digits")
    warnings.warn(note, DataFallbackWarning, stacklevel=2)
    return _digits(note)


def _fetch_hint(name: str, root: Path) -> str:
    command = f"batchnorm data fetch {name}"
    if root != default_data_dir():
        command += f" --data-dir {root}"
    return f"`{command}` downloads it (or copy the files there by hand)"


def load_requested_split(dataset: str | None = None,
                         data_dir: str | os.PathLike[str] | None = None) -> Split:
    """The split a command trains on, as its user asked for it.

    A request (a ``dataset``, a ``data_dir`` or ``$BATCHNORM_DATA``) that cannot be met
    raises :class:`FileNotFoundError` saying how to get the data. With nothing asked
    for, MNIST from :func:`default_data_dir`, else scikit-learn's bundled digits, with a
    :attr:`Split.note` that says so and how to get MNIST."""
    asked = dataset is not None or data_dir is not None or bool(os.environ.get("BATCHNORM_DATA"))
    name = dataset or "mnist"
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "digits":
        return load_split("digits")
    try:
        return load_split(name, root, fallback=False)
    except FileNotFoundError as error:
        if asked:
            raise FileNotFoundError(f"{error}; {_fetch_hint(name, root)}") from None
        return _digits(f"no MNIST under {_dataset_folder(root, name)}, so the bundled 8x8 "
                       f"digits are used instead; {_fetch_hint(name, root)}")
