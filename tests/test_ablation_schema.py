"""Ablation files are validated like run configs and study files (issue 15): typed dataclasses built by
config.build_dataclass (workbench/ablate/schema.py), each error one line naming the file, the dotted key and what
is allowed; every scale block is checked whichever scale runs (before: only the block of the scale asked for)."""

from __future__ import annotations

import pytest
import yaml
from conftest import TINY

from workbench import ablate
from workbench.ablate.schema import AblationFile
from workbench.cli import main
from workbench.config import ConfigError

SCALED = {"name": "sc", "variants": {"ar": {}, "mask": {"algorithms.token_masking.rate": 0.25}},
          "smoke": {"overrides": {"model": {"d_model": 32}}, "seeds": [5]},
          "scales": {"cpu": {"seeds": [0, 1], "repetition": {"unique_tokens": ["32k"], "epochs": [1, 2]}}}}


def write(tmp_path, body: dict):
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump({"base": TINY, **body}, sort_keys=False))
    return path


@pytest.mark.parametrize(("body", "message"), [
    # a block of a scale not asked for: found by a plain (or CPU) dry run, not on the GPU machine hours later
    ({"scales": {"gpu": {"modle": {"d_model": 512}}}},
     "scales.gpu.modle: unknown key; allowed in scales.gpu: grid, overrides, repetition, seeds, zip (run-config "
     "changes go under scales.gpu.overrides)"),
    ({"scales": {"gpu": {"seeds": [1, 1]}}}, "scales.gpu.seeds: repeated seeds [1, 1]"),
    ({"smoke": {"repetition": {"epochs": [0], "unique_tokens": [1000]}}}, "smoke.repetition.epochs: must be positive"),
    ({"scales": {"gpu": {"repetition": {"epochs": [1.5], "unique_tokens": [1000]}}}},
     "scales.gpu.repetition.epochs: epochs are whole numbers, got 1.5"),
    ({"smoke": {"seeds": [1]}, "scales": {"smoke": {"seeds": [2]}}},
     "scales.smoke: the smoke scale is defined twice (smoke: and scales.smoke)"),
])
def test_every_scale_block_is_checked_whichever_scale_runs(tmp_path, body, message):
    path = write(tmp_path, {**SCALED, **body, "scales": {**SCALED["scales"], **body.get("scales", {})}})
    for kwargs in ({}, {"scale": "cpu"}):
        with pytest.raises(ConfigError) as info:
            ablate.load_ablation(path, **kwargs)
        assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(("body", "message"), [
    ({"repetition": {"epochs": [1], "unique_token": ["32k"]}},
     "repetition.unique_token: unknown key; allowed in repetition: epochs, total_tokens, unique_tokens"),
    ({"parallel": "two"}, "parallel: expected an integer, got 'two'"),
    ({"parallel": 0}, "parallel: expected a whole number >= 1, got 0"),
    ({"seeds": "0,1"}, "seeds: expected int or list of int or null, got '0,1'"),
    ({"description": ["a"]}, "description: expected a string, got ['a']"),
])
def test_wrong_values_name_the_file_key_and_what_is_allowed(tmp_path, capsys, body, message):
    path = write(tmp_path, {**SCALED, **body})
    with pytest.raises(ConfigError) as info:
        ablate.load_ablation(path)
    assert str(info.value) == f"{path}: {message}"
    assert main(["ablate", str(path), "--dry-run", "--no-probe"]) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}\n"


def test_the_file_is_built_by_the_run_config_builder(tmp_path):
    """Not a hand-written isinstance chain: the typed sections come back as dataclasses."""
    from workbench.ablate.schema import RepetitionBlock, ScaleBlock, read_ablation_file

    spec = read_ablation_file(yaml.safe_load(write(tmp_path, SCALED).read_text()), "abl.yaml")
    assert isinstance(spec, AblationFile) and isinstance(spec.smoke, ScaleBlock)
    assert isinstance(spec.scales["cpu"].repetition, RepetitionBlock)
    assert spec.scales["cpu"].repetition.pairs() == [(32000, 1), (32000, 2)]
    assert spec.scale_names() == ["cpu", "smoke"]
