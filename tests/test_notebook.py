"""results/analysis.ipynb runs top to bottom (nbclient) on the shared smoke ablation, so it cannot silently break."""

from __future__ import annotations

import nbformat
import pytest
from ablation_smoke import smoke_results
from nbclient import NotebookClient

from workbench.paths import REPO_ROOT

NOTEBOOK = REPO_ROOT / "results" / "analysis.ipynb"


@pytest.mark.slow
def test_analysis_notebook_executes_on_a_smoke_ablation(monkeypatch, tmp_path):
    root = smoke_results()[0]
    monkeypatch.setenv("WORKBENCH_ANALYSIS_RESULTS", str(root))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    client = NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{root}: 3 runs, 3 variants" in text and "3 run folders, 0 not complete or without evaluations" in text
    # the report's per-metric targets: AR variants against the AR baseline, the single MDM variant against nothing
    assert "speed-up relative to `ar`" in text and "no speed-up (no other variant of this metric)" in text
    markdown = "\n".join(o["data"].get("text/markdown", "") for o in outputs if o.output_type == "display_data")
    assert "| ar | 0 | ar | ar_nll | none |" in markdown and "| mdm | 0 | mdm | mdm_nelbo |" in markdown
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o["data"]]
    assert len(images) >= 3  # loss vs. epoch, loss vs. tokens, best loss vs. masking strength
