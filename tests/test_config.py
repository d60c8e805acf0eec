"""The config loader: every bad input names the file, the key and what is allowed."""

from __future__ import annotations

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
