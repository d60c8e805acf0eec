"""results/analysis.ipynb runs top to bottom (nbclient) on the shared smoke ablation and on the committed
reproduction studies, so it cannot silently break."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import nbformat
import pytest
from ablation_smoke import smoke_results
from nbclient import NotebookClient

from workbench.paths import REPO_ROOT

NOTEBOOK = REPO_ROOT / "results" / "analysis.ipynb"
REPRO = REPO_ROOT / "results" / "repro"
CLAIM_ABLATIONS = ("repetition", "regularizers", "dual_ratio", "time_sampling")
# the line part 2 prints at the top of each study's section (part 1's size line has no seed count)
STUDY_LINE = re.compile(r"^(\S+): \d+ runs, \d+ variants, \d+ seeds; unigram entropy", re.MULTILINE)


def copy_committed_studies(root: Path) -> list[str]:
    """Copy the committed studies (regularizers-cpu and every folder with report/headline.csv, checkpoints left
    out) to ``root``: a study still being written under results/repro never reaches the notebook."""
    names = sorted({"regularizers-cpu", *(path.parent.parent.name for path in REPRO.glob("*/report/headline.csv"))})
    for name in names:
        shutil.copytree(REPRO / name, root / name, ignore=shutil.ignore_patterns("checkpoints"))
    return names


def images_per_study(outputs: list) -> tuple[list[str], Counter]:
    """Study sections in output order, and how many images each displayed (images before the first are part 1's)."""
    sections: list[str] = []
    images: Counter = Counter()
    for output in outputs:
        if output.output_type == "stream":
            sections += STUDY_LINE.findall(output.get("text", ""))
        elif sections and output.output_type == "display_data" and "image/png" in output["data"]:
            images[sections[-1]] += 1
    return sections, images


def test_analysis_notebook_quotes_no_measured_numbers():
    """Measured numbers live in results/repro/README.md (checked by test_reproduce), never in the notebook."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    quoted = [number for cell in notebook.cells for number in re.findall(r"\d\.\d{3,}", cell.source)]
    assert not quoted, f"the notebook hard-codes measured numbers: {quoted}"


@pytest.mark.slow
def test_analysis_notebook_executes_on_a_smoke_ablation(monkeypatch, tmp_path):
    root = smoke_results()[0]
    studies = copy_committed_studies(tmp_path / "repro")
    monkeypatch.setenv("WORKBENCH_ANALYSIS_RESULTS", str(root))
    monkeypatch.setenv("WORKBENCH_REPRO_RESULTS", str(tmp_path / "repro"))
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
    sections, images = images_per_study(outputs)
    all_images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o["data"]]
    assert len(all_images) - sum(images.values()) >= 3  # part 1: loss vs. epoch, vs. tokens, best vs. strength

    # part 2: one section per committed study, each with its curves vs. epoch and vs. tokens; absent studies named
    assert f"{tmp_path / 'repro'}: {len(studies)} committed studies ({', '.join(studies)})" in text
    assert sections == studies
    assert all(images[name] >= 2 for name in studies), images
    assert images["regularizers-cpu"] >= 3  # plus claim 2's best loss vs. regularization strength
    for ablation in CLAIM_ABLATIONS:
        if not any(name.startswith(f"{ablation}-") for name in studies):
            assert re.search(rf"^{ablation} \(claims? [^)]*\): no committed study yet, skipped$", text, re.MULTILINE)
    assert markdown.count("| variant | seeds | best_mean | best_std | best_min | best_max |") == len(studies)
