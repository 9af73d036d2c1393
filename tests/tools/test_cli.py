"""``batchnorm doctor`` and ``batchnorm fold`` on saved models and factories: files load
without running code unless --allow-pickle, and every bad input is one error line."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from batchnorm.cli import main

FACTORY_SOURCE = '''
from torch import nn

def broken():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    model[1].train()
    return model

def untrained():
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3, bias=False),
                         nn.BatchNorm1d(3)).eval()
'''


class Payload:
    """Unpickling this creates the file ``marker``: a stand-in for any command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """``models:broken`` and ``models:untrained`` importable for the command."""
    (tmp_path / "models.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("models", None)


def error_line(capsys) -> str:
    [line] = capsys.readouterr().err.strip().splitlines()
    return line


def trained_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3, bias=False), nn.BatchNorm1d(3))
    with torch.no_grad():
        for _ in range(40):
            model(torch.randn(32, 1, 8, 8))
    return model.eval()


def test_doctor_on_a_state_dict_loaded_into_its_factory_model_exits_0(tmp_path, capsys,
                                                                        factories):
    torch.save(trained_model().state_dict(), tmp_path / "weights.pt")
    torch.save(torch.randn(32, 1, 8, 8), tmp_path / "batch.pt")
    assert main(["doctor", "models:untrained", "--weights", str(tmp_path / "weights.pt"),
                 "--batch", str(tmp_path / "batch.pt")]) == 0
    assert capsys.readouterr().out.strip() == "no BatchNorm problems found"


def test_doctor_on_a_trusted_pickled_model_with_allow_pickle_exits_0(tmp_path, capsys):
    torch.save(trained_model(), tmp_path / "model.pt")
    assert main(["doctor", str(tmp_path / "model.pt"), "--allow-pickle"]) == 0
    assert capsys.readouterr().out.strip() == "no BatchNorm problems found"


def test_a_pickled_file_is_refused_without_running_its_code(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save(Payload(marker), tmp_path / "evil.pt")
    for command in (["doctor", str(tmp_path / "evil.pt")],
                    ["fold", str(tmp_path / "evil.pt"), str(tmp_path / "out.pt")]):
        assert main(command) == 2
        line = error_line(capsys)
        assert f"{tmp_path / 'evil.pt'}: MODEL file is a pickle that would call io.open" in line
        assert "--allow-pickle if you trust the file" in line
        assert not marker.exists()


@pytest.mark.parametrize("make, expected", [
    (lambda path: None, "MODEL '{path}': no such file"),
    (lambda path: path.write_bytes(b"\x00not a torch file"), "{path}: unreadable MODEL file"),
    (lambda path: torch.save(trained_model().state_dict(), path),
     "{path}: MODEL file holds a state_dict, not a model"),
    (lambda path: torch.save(torch.zeros(3), path),
     "{path}: MODEL is not a model: expected a torch.nn.Module, got Tensor"),
])
def test_a_bad_model_file_is_one_error_line_and_exit_2(make, expected, tmp_path, capsys):
    path = tmp_path / "model.pt"
    make(path)
    assert main(["doctor", str(path)]) == 2
    assert error_line(capsys).startswith(f"batchnorm doctor: error: {expected.format(path=path)}")


@pytest.mark.parametrize("batch, expected", [
    (b"\x00garbage", "{path}: unreadable --batch file"),
    ({"x": 1}, "{path}: not a batch: expected a tensor or an (input, target) tuple, got dict"),
    (torch.randn(4, 3, 8, 8), "--batch {path}: doctor: the model failed on the given batch"),
])
def test_a_wrong_batch_file_is_one_error_line_and_exit_2(batch, expected, tmp_path, capsys,
                                                          factories):
    path = tmp_path / "batch.pt"
    if isinstance(batch, bytes):
        path.write_bytes(batch)
    else:
        torch.save(batch, path)
    assert main(["doctor", "models:untrained", "--batch", str(path)]) == 2
    assert error_line(capsys).startswith(f"batchnorm doctor: error: {expected.format(path=path)}")


def test_weights_that_do_not_fit_the_model_are_one_error_line(tmp_path, capsys, factories):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    assert main(["doctor", "models:untrained", "--weights", str(tmp_path / "weights.pt")]) == 2
    assert "weights.pt: state_dict does not fit MODEL" in error_line(capsys)


def test_doctor_prints_a_table_and_exits_1_on_an_error(capsys, factories):
    assert main(["doctor", "models:broken"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SEVERITY", "CODE", "LAYER", "MESSAGE", "/", "FIX"]
    rows = [line.split()[:3] for line in out[1:] if not line.lstrip().startswith("fix:")]
    assert ["error", "bn-in-train-mode", "1"] in rows
    assert ["info", "redundant-bias", "0"] in rows


def test_fold_saves_a_model_with_equal_eval_outputs(tmp_path, capsys, factories):
    model = trained_model()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert main(["fold", "models:untrained", "--weights", str(tmp_path / "weights.pt"),
                 str(tmp_path / "folded.pt")]) == 0
    assert "BatchNorm layers 2 -> 0" in capsys.readouterr().out
    folded = torch.load(tmp_path / "folded.pt", weights_only=False)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
