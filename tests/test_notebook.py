"""docs/quickstart.ipynb runs top to bottom (nbclient, a fresh kernel of this interpreter) and
is stored without outputs."""

import json
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"


def test_the_notebook_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")


@pytest.mark.slow
@pytest.mark.mnist
def test_the_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    spec = tmp_path / "kernels" / "jaxdnn"  # this interpreter, whatever kernels the machine has
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxdnn", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    NotebookClient(nb, timeout=600, kernel_name="jaxdnn", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "P(reach $200)" in text and "notebook ran in" in text, text
    # the flow's bits/dim is the card's (the model's own dequantizer), within 3 standard errors of 500 images
    mean, stderr, card = map(float, re.search(r"RealNVP bits/dim of 500 test images: (\S+) \+- (\S+) \(card: (\S+)\)",
                                              text).groups())
    assert abs(mean - card) < 3 * stderr and stderr < 0.02, text
