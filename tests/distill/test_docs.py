"""The examples in docs/distill.md run as written."""
import pathlib
import re
import warnings

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "distill.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index].replace("/tmp/distill.pt", str(tmp_path / "distill.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        namespace: dict = {}
        exec(compile(code, f"docs/distill.md[{index}]", "exec"), namespace)
    assert namespace["result"].report.ok
