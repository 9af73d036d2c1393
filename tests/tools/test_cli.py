"""``batchnorm doctor`` and ``batchnorm fold`` on saved models and factories."""

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
'''


def trained_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3, bias=False), nn.BatchNorm1d(3))
    with torch.no_grad():
        for _ in range(40):
            model(torch.randn(32, 1, 8, 8))
    return model.eval()


def test_doctor_on_a_healthy_saved_model_exits_0(tmp_path, capsys):
    torch.save(trained_model(), tmp_path / "model.pt")
    torch.save(torch.randn(32, 1, 8, 8), tmp_path / "batch.pt")
    assert main(["doctor", str(tmp_path / "model.pt"), "--batch",
                 str(tmp_path / "batch.pt")]) == 0
    assert capsys.readouterr().out.strip() == "no BatchNorm problems found"


def test_doctor_prints_a_table_and_exits_1_on_an_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_models.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["doctor", "broken_models:broken"]) == 1
    finally:
        sys.modules.pop("broken_models", None)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SEVERITY", "CODE", "LAYER", "MESSAGE", "/", "FIX"]
    rows = [line.split()[:3] for line in out[1:] if not line.lstrip().startswith("fix:")]
    assert ["error", "bn-in-train-mode", "1"] in rows
    assert ["info", "redundant-bias", "0"] in rows


def test_doctor_rejects_a_state_dict_with_a_clear_message(tmp_path):
    torch.save(trained_model().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(SystemExit, match=r"must hold a torch\.nn\.Module, got OrderedDict"):
        main(["doctor", str(tmp_path / "weights.pt")])


def test_fold_saves_a_model_with_equal_eval_outputs(tmp_path, capsys):
    model = trained_model()
    torch.save(model, tmp_path / "model.pt")
    assert main(["fold", str(tmp_path / "model.pt"), str(tmp_path / "folded.pt")]) == 0
    assert "BatchNorm layers 2 -> 0" in capsys.readouterr().out
    folded = torch.load(tmp_path / "folded.pt", weights_only=False)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
