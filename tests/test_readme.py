"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_convert_revert_keep_the_model_working():
    section = README.read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["y"].shape == (32, 64, 28, 28)
    model = namespace["model"]
    assert type(model[1]).__module__ == "torch.nn.modules.batchnorm"  # reverted
