"""``batchnorm data``: download a dataset into the data folder, or check the files there
against their published MD5 checksums.

The data folder is ``--data-dir``, else ``$BATCHNORM_DATA``, else ``~/.cache/batchnorm``;
each dataset lives in its own subfolder (``mnist/``, ``fashion-mnist/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from batchnorm.data.datasets import (
    DATASETS,
    DEFAULT_DOWNLOAD_DEADLINE,
    default_data_dir,
    download_missing,
    mirrors_for,
)
from batchnorm.data.download import DownloadError, file_md5
from batchnorm.errors import InputError


def _status(folder: Path, gz_name: str, md5: str) -> tuple[str, bool]:
    """What is in ``folder`` for one official file, and whether that is a problem."""
    if (folder / gz_name).is_file():
        actual = file_md5(folder / gz_name)
        if actual == md5:
            return "ok (MD5 matches)", True
        return f"BAD: its MD5 is {actual}; delete it and fetch again", False
    if (folder / gz_name.removesuffix(".gz")).is_file():
        return "raw file (no published checksum; its structure is checked on load)", True
    if gz_name.startswith("train-"):
        return "missing (optional: without it the test set is split 8,000/2,000)", True
    return "missing", False


def _table(name: str, folder: Path) -> bool:
    """Print one line per official file of ``name`` (file, published MD5, status);
    True when the dataset can be loaded from what is there."""
    print(f"{name} in {folder}:")
    fine = True
    for gz_name, md5 in DATASETS[name].md5.items():
        status, ok = _status(folder, gz_name, md5)
        print(f"  {gz_name:<28} {md5}  {status}")
        fine = fine and ok
    return fine


def _download_failure(name: str, folder: Path, error: DownloadError) -> str:
    hosts = ", ".join(sorted({url.split("/")[2] for url in mirrors_for(name)}))
    if error.offline:
        reason = f"no network: none of {hosts} resolves"
    else:
        last = str(error.causes[-1] if error.causes else error).splitlines()[0]
        reason = f"from {hosts}, last error: {last}"
    return (f"could not download {name} ({reason}); copy the files that "
            f"`batchnorm data check {name}` lists into {folder} by hand, or retry later")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm data", description=__doc__)
    parser.add_argument("action", choices=["fetch", "check"],
                        help="fetch: download the missing files and check them; check: "
                             "list the files, their published MD5s and what is there")
    parser.add_argument("name", nargs="?", default="mnist", choices=sorted(DATASETS),
                        help="dataset (default: mnist)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding <dataset>/ (default: $BATCHNORM_DATA, else "
                             "~/.cache/batchnorm)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DOWNLOAD_DEADLINE,
                        help="seconds the whole download may take (default: %(default)g)")
    args = parser.parse_args(argv)
    if args.deadline <= 0:
        parser.error(f"--deadline must be positive, got {args.deadline}")
    root = args.data_dir.expanduser() if args.data_dir is not None else default_data_dir()
    folder = root / DATASETS[args.name].folder
    if args.action == "fetch":
        try:
            for path in download_missing(args.name, folder, mirrors_for(args.name),
                                         args.deadline):
                print(f"downloaded {path}")
        except DownloadError as error:
            raise InputError(_download_failure(args.name, folder, error)) from None
    return 0 if _table(args.name, folder) else 1
