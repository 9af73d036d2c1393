"""``batchnorm data fetch`` / ``check``: downloads with their checksums, and a clear
one-line error without network."""

from __future__ import annotations

import numpy as np

from batchnorm.cli import main
from batchnorm.data import datasets


def parts() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {part: (rng.integers(0, 256, (count, 4, 4), dtype=np.uint8),
                   rng.integers(0, 10, count, dtype=np.uint8))
            for part, count in (("train", 12), ("test", 5))}


def test_fetch_downloads_into_the_default_folder_and_lists_each_file_with_its_md5(
        empty_home, serve_mnist, capsys):
    md5 = serve_mnist(parts())
    assert main(["data", "fetch", "mnist"]) == 0
    folder = empty_home / ".cache" / "batchnorm" / "mnist"
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [f"downloaded {folder / name}" for name in
                       ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")]
    assert out[4] == f"mnist in {folder}:"
    assert sorted(out[5:]) == sorted(f"  {name:<28} {digest}  ok (MD5 matches)"
                                     for name, digest in md5.items())
    assert main(["data", "fetch"]) == 0  # nothing left to download
    assert not any(line.startswith("downloaded") for line in capsys.readouterr().out.splitlines())


def test_fetch_without_network_is_one_error_line_saying_so(empty_home, no_network, capsys):
    folder = empty_home / "data"
    assert main(["data", "fetch", "mnist", "--data-dir", str(folder)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    hosts = sorted({url.split("/")[2] for url in datasets.DATASETS["mnist"].mirrors})
    assert line.startswith(f"batchnorm data: error: could not download mnist (no network: "
                           f"none of {', '.join(hosts)} resolves); copy the files that "
                           f"`batchnorm data check mnist` lists into {folder / 'mnist'}")
    assert len(no_network) == len(hosts)  # one try per mirror, no retries


def test_check_flags_a_corrupt_file_and_exits_1(empty_home, serve_mnist, capsys):
    serve_mnist(parts())
    assert main(["data", "fetch"]) == 0
    images = empty_home / ".cache/batchnorm/mnist/t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-1])
    capsys.readouterr()
    assert main(["data", "check"]) == 1
    [line] = [line for line in capsys.readouterr().out.splitlines() if "t10k-images" in line]
    assert "BAD: its MD5 is" in line and "delete it and fetch again" in line


def test_check_of_an_empty_folder_lists_the_published_md5s_and_exits_1(empty_home, capsys):
    assert main(["data", "check", "fashion-mnist"]) == 1
    out = capsys.readouterr().out
    for name, digest in datasets.DATASETS["fashion-mnist"].md5.items():
        assert f"  {name:<28} {digest}  missing" in out
