"""The Python examples of the README and of every docs page run as written (so neither can rot).

Only ```python blocks run; output and shell sessions are ```text, ```console or ```bash, and an example that
needs a GPU or a Tenstorrent device is not written as a ```python block.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


EXAMPLES = [(page, index) for page in PAGES for index in range(len(python_blocks(page)))]


def test_readme_has_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 2


def test_docs_pages_exist():
    assert len(PAGES) > 1, "no docs/*.md pages found"


@pytest.mark.parametrize(
    ("page", "index"), EXAMPLES, ids=[f"{page.relative_to(ROOT)}[{index}]" for page, index in EXAMPLES]
)
def test_example_runs(page, index, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    from crosscheck.porting import port
    from crosscheck.references import torch_ref

    # The porting example loads "weights.safetensors" from the working directory.
    port.save_file(torch_ref.MultiHeadAttention(3, 2, 6, 0.0, 2).state_dict(), tmp_path / "weights.safetensors")
    from crosscheck.variants.plugins import registrations

    namespace: dict = {}
    name = f"{page.relative_to(ROOT)}[python block {index}]"
    with registrations():  # a page's plugin (docs/own_attention.md) registers for its block only
        exec(compile(python_blocks(page)[index], name, "exec"), namespace)
