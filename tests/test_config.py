"""The config loader: every bad input names the file, the key and what is allowed."""

from __future__ import annotations

import copy

import pytest

from workbench.config import ConfigError, load_run_config, parse_count, parse_duration


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,key,message", [
    ("model: {n_layrs: 3}", "model.n_layrs", "unknown key; allowed in model: attention"),
    ("nonsense: 1", "nonsense", "unknown key; allowed in the top level"),
    ("model: {n_layers: two}", "model.n_layers", "expected an integer"),
    ("objective: {name: mdm, diffusion: {eps: 0}}", "objective.diffusion.eps", "must be in (0, 1)"),
    ("algorithms: {token_masking: {rate: 1.5}}", "algorithms.token_masking.rate", "masking rate in [0, 1]"),
    ("algorithms: {dropout: {mlp: 1.0}}", "algorithms.dropout.mlp", "dropout probability in [0, 1)"),
    ("objective: {name: mdm, diffusion: {time_sampler: {name: gamma}}}", "objective.diffusion.time_sampler.name",
     "'gamma' is not allowed; expected one of 'uniform'"),
    ("objective: {name: ar, dual: {ar_fraction: 0.5}}", "objective.dual", "only used with name: dual"),
    ("objective: {name: dual, dual: {ar_fraction: 1.5}}", "objective.dual.ar_fraction", "fraction in [0, 1]"),
    ("objective: {name: mdm}\nalgorithms: {token_masking: {rate: 0.1}}", "algorithms.token_masking",
     "objective mdm already masks"),
    ("optimizer: {weight_decay: 0.1}\nalgorithms: {weight_decay: {value: 0.1}}", "algorithms.weight_decay",
     "declared twice"),
    ("algorithms: {token_masking: {rate: 0.1, max_rate: 0.2, time_sampler: {name: uniform}}}",
     "algorithms.token_masking.time_sampler", "choose one of rate, max_rate or time_sampler"),
    ("data: {unique_tokens: 5Q}", "data.unique_tokens", "expected a count"),
    ("data: {seq_len: 128, unique_tokens: 100}", "data.unique_tokens", "at least one sequence"),
    ("model: {d_model: 100, n_heads: 3}", "model.d_model", "heads of even size"),
    ("trainer: {max_duration: 10 epochs}", "trainer.max_duration", "expected a duration"),
    ("callbacks: {wandb: {}}", "callbacks.wandb", "allowed: speed_monitor"),
    ("eval: {metrics: []}", "eval.metrics", "at least one metric"),
    ("name: 'has space'", "name", "names a folder"),
])
def test_bad_values_name_file_key_and_allowed(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert info.value.source == str(path) and info.value.key == key
    assert message in info.value.message


def test_overrides_base_and_expansions(tmp_path):
    write(tmp_path, "name: base\nmodel: {n_layers: 4, d_model: 256}\noptimizer: {lr: 0.001}\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\nname: child\nmodel: {n_layers: 6}\ndata: {unique_tokens: 5M}\n")
    config = load_run_config(path, ["optimizer.lr=2e-4", "algorithms.dropout.mlp=0.1", "trainer.max_duration=4Mtok"])
    assert (config.name, config.model.n_layers, config.model.d_model) == ("child", 6, 256)
    assert config.optimizer.lr == 2e-4 and config.algorithms.dropout.mlp == 0.1
    assert config.data.unique_tokens == 5_000_000 and config.trainer.max_duration == "4000000tok"


def test_override_errors_name_the_command_line(tmp_path):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=r"command line: optimizer\.lr"):
        load_run_config(path, ["optimizer.lr"])


def test_objective_defaults_follow_the_objective():
    from workbench.config import config_from_dict

    dual = config_from_dict({"objective": {"name": "dual"}})
    assert dual.objective.diffusion.shifted is True and dual.eval_metrics == ["ar_nll", "mdm_nelbo"]
    mdm = config_from_dict({"objective": {"name": "mdm"}})
    assert mdm.objective.diffusion.shifted is False and mdm.eval_metrics == ["mdm_nelbo"]
    assert config_from_dict({}).eval_metrics == ["ar_nll"]


def test_heavy_tailed_elbo_weights_warn():
    from workbench.config import config_from_dict

    with pytest.warns(UserWarning, match="infinite variance"):
        config_from_dict({"objective": {"name": "mdm", "diffusion": {"time_sampler": {"name": "logit_normal"}}}})


def test_counts_and_durations():
    assert parse_count("5M") == 5_000_000 and parse_count("2.5k") == 2500 and parse_count(1_000) == 1000
    assert parse_duration("20ep") == "20ep" and parse_duration("1.5Mtok") == "1500000tok"
    assert parse_duration("0.1dur") == "0.1dur"
    for bad in ("1.5dur", "ep", "-3ep"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# --------------------------------------------------------------------------------------------------------------
# issue 12: non-finite numbers, microbatches and processes, base: chains, the one YAML reader

def _numeric_keys(cls=None, prefix=""):
    """(dotted key, type, context) for every int and float key of the run-config schema; context switches on
    the section that holds the key (objective.dual only exists with objective.name dual, ...)."""
    import dataclasses
    import types
    import typing

    from workbench.config import RunConfig

    cls = cls or RunConfig
    contexts = {"objective.diffusion": {"objective": {"name": "mdm"}},
                "objective.dual": {"objective": {"name": "dual"}},
                "objective.prefix_lm": {"objective": {"name": "prefix_lm"}}}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        options = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] if typing.get_origin(
            hints[f.name]) in (typing.Union, types.UnionType) else [hints[f.name]]
        for tp in options:
            if dataclasses.is_dataclass(tp):
                yield from ((k, t, c or contexts.get(dotted, {})) for k, t, c in _numeric_keys(tp, dotted))
            elif tp in (int, float) and "parse" not in f.metadata:
                yield dotted, tp, contexts.get(prefix, {})
            elif typing.get_origin(tp) is list and typing.get_args(tp) == (float,):
                yield dotted, list, contexts.get(prefix, {})


NUMERIC_KEYS = list(_numeric_keys())


def test_the_schema_walk_finds_the_numeric_keys():
    keys = {k for k, _, _ in NUMERIC_KEYS}
    assert {"optimizer.lr", "optimizer.betas", "model.mlp_ratio", "trainer.grad_clip_norm", "objective.z_loss",
            "objective.diffusion.eps", "objective.diffusion.time_sampler.a", "objective.dual.ar_fraction_end",
            "algorithms.token_masking.max_rate", "algorithms.dropout.mlp", "eval.downstream.cfg_weight",
            "data.batch_size", "trainer.microbatch_size", "seed"} <= keys
    assert len(keys) > 40


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key,tp,context", NUMERIC_KEYS, ids=[k for k, _, _ in NUMERIC_KEYS])
def test_every_numeric_key_refuses_non_finite_values(tmp_path, key, tp, context, value):
    import yaml

    from workbench.config import set_dotted

    values = copy.deepcopy(context)
    set_dotted(values, key, "@" if tp is not list else ["@", 0.9])
    path = write(tmp_path, yaml.safe_dump(values).replace("'@'", value))
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert info.value.source == str(path)
    assert info.value.key == (f"{key}[0]" if tp is list else key)
    assert ("expected a finite number" if tp is not int else "expected an integer") in info.value.message


def test_overrides_refuse_non_finite_numbers(tmp_path):
    path = write(tmp_path, "name: x\n")
    for raw in ("inf", "-Infinity", "nan", "1e999"):
        with pytest.raises(ConfigError, match=r"^command line: optimizer\.lr: expected a finite number"):
            load_run_config(path, [f"optimizer.lr={raw}"])


@pytest.mark.parametrize("batch,micro,world,key,message", [
    (16, 0, 1, "trainer.microbatch_size", "must be >= 1"),
    (16, -2, 1, "trainer.microbatch_size", "must be >= 1"),
    (16, 5, 1, "trainer.microbatch_size", "allowed: 1, 2, 4, 8, 16 or null"),
    (16, None, 3, "data.batch_size", "not divisible by the 3 processes"),
    (24, 8, 2, "trainer.microbatch_size", "per-process batch of 12 (data.batch_size 24 / 2 processes); allowed: "
     "1, 2, 3, 4, 6, 12 or null"),
])
def test_batches_split_over_processes_and_microbatches(tmp_path, batch, micro, world, key, message):
    path = write(tmp_path, f"data: {{batch_size: {batch}}}\neval: {{batch_size: 48}}\n"
                 f"trainer: {{microbatch_size: {'null' if micro is None else micro}}}\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, world_size=world)
    assert (info.value.source, info.value.key) == (str(path), key) and message in info.value.message


def test_batches_that_split_evenly_pass():
    from workbench.config import check_processes, config_from_dict

    config = config_from_dict({"data": {"batch_size": 24}, "eval": {"batch_size": 48},
                               "trainer": {"microbatch_size": 4}})
    for world in (1, 2, 3, 6):
        check_processes(config, world)
    with pytest.raises(ConfigError, match=r"eval\.batch_size: 48 is not divisible by the 5 processes"):
        check_processes(config_from_dict({"data": {"batch_size": 10}, "eval": {"batch_size": 48}}), 5)


def test_base_cycles_are_named(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: c.yaml\n", "b.yaml")
    write(tmp_path, "base: a.yaml\nseed: 3\n", "c.yaml")
    with pytest.raises(ConfigError) as info:
        load_run_config(tmp_path / "a.yaml")
    assert info.value.source == str(tmp_path / "c.yaml") and info.value.key == "base"
    names = [p.rsplit("/", 1)[-1] for p in info.value.message.split(": ", 1)[1].split(" -> ")]
    assert names == ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]
    # the same file twice is no cycle when it is not on the chain (a diamond is fine)
    write(tmp_path, "seed: 5\n", "common.yaml")
    write(tmp_path, "base: common.yaml\nmodel: {n_layers: 3}\n", "left.yaml")
    write(tmp_path, "base: left.yaml\n", "top.yaml")
    assert load_run_config(tmp_path / "top.yaml").seed == 5


def test_errors_name_the_file_that_holds_the_value(tmp_path):
    write(tmp_path, "model: {n_heads: 3}\noptimizer: {lr: -1}\n", "grand.yaml")
    write(tmp_path, "base: grand.yaml\noptimizer: {lr: 0.001}\nmodel: {d_model: 64}\n", "parent.yaml")
    child = write(tmp_path, "base: parent.yaml\nmodel: {n_heads: 4}\n")
    assert load_run_config(child).optimizer.lr == 0.001  # parent overrides grand's bad lr
    for overrides, source, key in [
        (["optimizer.lr=-2"], "command line", "optimizer.lr"),
        (["model.n_heads=3"], str(tmp_path / "parent.yaml"), "model.d_model"),  # the key named: who set it
        (["data.batch_size=0"], "command line", "data.batch_size"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_run_config(child, overrides)
        assert (info.value.source, info.value.key) == (source, key)
    write(tmp_path, "base: grand.yaml\nmodel: {d_model: 64, n_layers: 2}\n", "parent.yaml")
    with pytest.raises(ConfigError) as info:
        load_run_config(child)
    assert (info.value.source, info.value.key) == (str(tmp_path / "grand.yaml"), "optimizer.lr")
    write(tmp_path, "optimizer: {betas: [0.9, 2]}\n", "grand.yaml")
    with pytest.raises(ConfigError) as info:
        load_run_config(child)
    assert (info.value.source, info.value.key) == (str(tmp_path / "grand.yaml"), "optimizer.betas")


def test_read_yaml_refuses_duplicates_empty_files_and_other_encodings(tmp_path):
    from workbench.config import read_yaml

    path = write(tmp_path, "eval:\n  downstream:\n    tasks: [piqa]\n    scorers: {piqa: ar,\n      piqa: chain}\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert info.value.key == "eval.downstream.scorers.piqa" and "line 5 (first on line 4)" in info.value.message
    path = write(tmp_path, "variants:\n  - {name: a, seed: 1, seed: 2}\n")
    with pytest.raises(ConfigError, match=r"variants\[0\]\.seed: duplicate key on line 2"):
        read_yaml(path)
    # anchors and merge keys are not duplicates; a key may repeat in different mappings
    path = write(tmp_path, "x: &d {a: 1, b: 2}\ny: {<<: *d, b: 3}\nz: {a: 1}\n")
    assert read_yaml(path) == {"x": {"a": 1, "b": 2}, "y": {"a": 1, "b": 3}, "z": {"a": 1}}
    for text in ("", "\n\n", "# a comment\n", "---\n"):
        with pytest.raises(ConfigError, match="empty"):
            read_yaml(write(tmp_path, text))
    (tmp_path / "latin1.yaml").write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 on line 1\)"):
        read_yaml(tmp_path / "latin1.yaml")
    (tmp_path / "bom.yaml").write_bytes("\ufeffname: café\n".encode())
    assert read_yaml(tmp_path / "bom.yaml") == {"name": "café"}


def test_shipped_yaml_files_read_cleanly_and_are_refused_by_train():
    from workbench.config import read_yaml
    from workbench.paths import REPO_ROOT

    ablations = sorted((REPO_ROOT / "ablations").glob("*.yaml"))
    studies = sorted((REPO_ROOT / "ablations" / "studies").glob("*.yaml"))
    assert ablations and studies
    for path in [*ablations, *studies, *(REPO_ROOT / "ablations" / "base").glob("*.yaml")]:
        assert read_yaml(path)  # UTF-8, no duplicate keys
    for paths, kind, command in ((ablations, "ablation file", "workbench ablate"),
                                 (studies, "study file", "workbench tune")):
        for path in paths:
            with pytest.raises(ConfigError) as info:
                load_run_config(path)
            assert kind in info.value.message and f"{command} {path}" in info.value.message
    assert load_run_config(REPO_ROOT / "ablations" / "base" / "gpu_small.yaml").name


@pytest.mark.parametrize("item", ["=3", ".lr=3", "optimizer..lr=3", "optimizer.=3", " =1"])
def test_override_keys_must_be_dotted_keys(tmp_path, item):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, [item])
    assert (info.value.source, info.value.key) == ("command line", item)
    assert "dotted key such as optimizer.lr" in info.value.message


def test_a_stored_config_with_a_duplicate_key_is_named(tmp_path):
    from workbench.config import config_differences, config_from_dict, dump_config

    config = config_from_dict({"name": "x"})
    stored = write(tmp_path, dump_config(config) + "seed: 3\n", "config.yaml")
    with pytest.raises(ConfigError) as info:
        config_differences(stored, config)
    assert (info.value.source, info.value.key) == (str(stored), "seed") and "duplicate key" in info.value.message
