"""Datasets for the experiments: MNIST and Fashion-MNIST from their IDX files, with a
documented split of the MNIST test set and a scikit-learn digits fallback."""

from batchnorm.data.datasets import (
    DATASETS,
    DataFallbackWarning,
    Split,
    default_data_dir,
    download_missing,
    load_requested_split,
    load_split,
    mirrors_for,
)
from batchnorm.data.download import DownloadError, download_file, verify_md5
from batchnorm.data.idx import DataFileError, read_idx

__all__ = ["DATASETS", "DataFallbackWarning", "DataFileError", "DownloadError", "Split",
           "default_data_dir", "download_file", "download_missing", "load_requested_split",
           "load_split", "mirrors_for", "read_idx", "verify_md5"]
