"""The README's Python examples run as written (copy-paste must work)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # examples that save write here
    code = BLOCKS[index].replace("history = fastmf.fit(model, fit_part, loss=\"mse\",",
                                 "history = fastmf.fit(model, fit_part, progress=False, "
                                 "loss=\"mse\",")
    namespace: dict = {}
    exec(compile(code, f"README.md example {index}", "exec"), namespace)
