"""Named scales of one ablation (``scales: {cpu: ...}`` and ``--scale NAME``; ``--smoke`` is the scale named
smoke): one file defines the GPU study and its laptop scale, and the two never share a results folder."""

from __future__ import annotations

import pytest
from test_ablate import SHIPPED, cli_args, write_ablation

from workbench import ablate
from workbench.cli import main
from workbench.commands import ablate as ablate_command
from workbench.config import ConfigError
from workbench.paths import REPO_ROOT

SCALED = {
    "name": "st",
    "seeds": [0],
    "variants": {"ar": {}, "mask": {"algorithms": ["token_masking"],
                                    "grid": {"algorithms.token_masking.rate": [0.1, 0.25]}}},
    "smoke": {"overrides": {"model": {"d_model": 32}}},
    "scales": {"cpu": {"seeds": [0, 1], "overrides": {"model": {"n_layers": 1}, "trainer": {"max_duration": "1ep"}}}},
}


def test_named_scale_applies_its_block_and_gets_its_own_folder(tmp_path, results_root):
    path = write_ablation(tmp_path, SCALED)
    full, cpu = ablate.load_ablation(path), ablate.load_ablation(path, scale="cpu", results_root=tmp_path / "r")
    assert full.scale is None and full.name == "st" and len(full.runs) == 3
    assert cpu.scale == "cpu" and cpu.name == "st-cpu" and not cpu.smoke
    assert [r.name for r in cpu.runs] == [f"st-cpu-{v}-seed{s}" for v in ("ar", "mask-rate0.1", "mask-rate0.25")
                                          for s in (0, 1)]
    assert {r.run_dir.parent.parent for r in cpu.runs} == {tmp_path / "r" / "st-cpu"}
    assert all(r.config.model.n_layers == 1 and r.config.trainer.max_duration == "1ep" for r in cpu.runs)
    assert [r.config.algorithms.token_masking.rate for r in cpu.runs if r.config.algorithms.token_masking] == [
        0.1, 0.1, 0.25, 0.25]  # the variants' own sweep is kept under a scale
    full_dirs = {r.run_dir for r in full.runs}
    assert not full_dirs & {r.run_dir for r in cpu.runs}
    # --smoke is the scale named smoke, and keeps the file's name and folder as it always has
    smoke, by_name = ablate.load_ablation(path, smoke=True), ablate.load_ablation(path, scale="smoke")
    assert smoke.smoke and by_name.smoke and smoke.scale == by_name.scale == "smoke" and smoke.name == "st"
    assert [r.config for r in smoke.runs] == [r.config for r in by_name.runs]
    assert all(r.config.model.d_model == 32 for r in smoke.runs)
    # the plan names the scale
    assert "(" + str(path) + ", cpu scale)" in ablate.format_plan(cpu, None, "", 1).splitlines()[0]


def test_unknown_scale_is_one_line_naming_the_allowed_ones(tmp_path, capsys):
    path = write_ablation(tmp_path, SCALED)
    with pytest.raises(ConfigError, match=r"abl.yaml: scales: --scale gpu needs a scales: gpu: block in the "
                       r"ablation file; scales here: cpu, smoke$"):
        ablate.load_ablation(path, scale="gpu")
    assert main(["ablate", str(path), "--scale", "gpu", "--dry-run", "--no-probe"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {path}: scales: --scale gpu needs a scales: gpu: block in the "
                                        "ablation file; scales here: cpu, smoke"]
    bare = write_ablation(tmp_path, {"variants": {"ar": {}}}, name="bare.yaml")
    with pytest.raises(ConfigError, match=r"--scale cpu needs a scales: cpu: block .*; scales here: none$"):
        ablate.load_ablation(bare, scale="cpu")
    with pytest.raises(ConfigError, match=r"--smoke is the scale named smoke"):
        ablate.load_ablation(path, smoke=True, scale="cpu")


def test_scale_blocks_are_checked_like_smoke(tmp_path):
    clash = write_ablation(tmp_path, {**SCALED, "scales": {"cpu": {"overrides": {"algorithms": {"token_masking": {
        "rate": 0.5}}}}}})
    with pytest.raises(ConfigError, match=r"scales.cpu.overrides.algorithms.token_masking.rate: would overwrite "
                       r"algorithms.token_masking.rate"):
        ablate.load_ablation(clash, scale="cpu")
    unknown = write_ablation(tmp_path, {**SCALED, "scales": {"cpu": {"model": {"d_model": 32}}}})
    with pytest.raises(ConfigError, match=r"scales.cpu.model: unknown key"):
        ablate.load_ablation(unknown, scale="cpu")
    not_mapping = write_ablation(tmp_path, {**SCALED, "scales": ["cpu"]})
    with pytest.raises(ConfigError, match=r"scales: expected a mapping of scale names"):
        ablate.load_ablation(not_mapping, scale="cpu")


def test_cli_scale_flag_plans_the_scale(tmp_path, capsys):
    path = write_ablation(tmp_path, SCALED)
    assert ablate_command.run(cli_args(path, scale="cpu", dry_run=True, results=str(tmp_path / "r"))) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"ablation st-cpu ({path}, cpu scale)"
    assert "6 runs (3 variants x 2 seeds)" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


@pytest.mark.parametrize("path", [p for p in SHIPPED if "scales:" in p.read_text()],
                         ids=lambda p: p.stem)
def test_shipped_scales_expand_and_validate(path):
    """Every named scale of a shipped ablation expands to validated runs in its own folder."""
    import yaml

    for scale in yaml.safe_load(path.read_text())["scales"]:
        abl = ablate.load_ablation(path, scale=scale)
        assert abl.name == f"{path.stem}-{scale}" and abl.runs
        assert all(r.run_dir.parent.parent.name == abl.name for r in abl.runs)


def test_regularizers_cpu_scale_is_the_demo_scale_with_two_seeds():
    """results/repro/regularizers-cpu is this scale: the demo's 2 x 64 model on 65,536 unique tokens x 12 epochs,
    two seeds on one data subset."""
    abl = ablate.load_ablation(REPO_ROOT / "ablations" / "regularizers.yaml", scale="cpu",
                               only=["ar", "mask*", "mlpdrop*", "wd*"])
    assert abl.seeds == [0, 1] and len(abl.runs) == 18
    for run in abl.runs:
        c = run.config
        assert (c.model.n_layers, c.model.d_model, c.data.tokenizer.vocab_size, c.data.seq_len) == (2, 64, 2048, 64)
        assert (c.data.unique_tokens, c.trainer.max_duration, c.objective.name) == (65536, "12ep", "ar")
    assert len({r.config.data.subset_seed for r in abl.runs}) == 1
