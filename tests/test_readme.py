"""The README's Python examples run as written (so the API tour cannot rot)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    from crosscheck.porting import port
    from crosscheck.references import torch_ref

    # The porting example loads "weights.safetensors" from the working directory.
    port.save_file(torch_ref.MultiHeadAttention(3, 2, 6, 0.0, 2).state_dict(), tmp_path / "weights.safetensors")
    namespace: dict = {}
    exec(compile(python_blocks()[index], f"README.md[python block {index}]", "exec"), namespace)
