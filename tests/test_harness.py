"""lm-evaluation-harness adapter: the harness, reading the bundled task files offline through the wb_* YAMLs,
scores a trained tiny AR run exactly as the workbench's own scorer does, item by item (log-likelihoods, acc,
acc_norm); the harness CLI finds the registered model; MDM runs score with the MC-ELBO."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zlib

import polars as pl
import pytest
import yaml

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from workbench.cli import main
from workbench.config import ConfigError, TokenizerConfig
from workbench.evaluation.harness import HARNESS_TASKS, WorkbenchHarnessLM, evaluate, request_rows
from workbench.evaluation.scoring import Rows, score_batch, score_rows
from workbench.evaluation.tasks import BatchOptions, collate_items, encode_items, read_task
from workbench.results import read_metrics
from workbench.train import train

SHORT = {"max_duration": "16ba", "checkpoint_interval": "16ba"}
PARITY_TASKS = ["piqa", "arc_easy"]
LIMIT = 40  # the first 40 items of each task, and every item of the first 400 with non-ASCII characters in a
SCAN = 400  # choice (12 in piqa, 2 in arc_easy): there characters (the harness's acc_norm) and UTF-8 bytes differ


def _parity_items(task: str) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = read_task(task).items[:SCAN]
    wide = [i for i, item in enumerate(items) if any(len(c) != len(c.encode()) for c in item.continuations)]
    return sorted(set(range(LIMIT)) | set(wide))


def _harness_task(task: str):
    """The documents the wb_<task> YAML gives the harness (its custom_dataset function) and its target_delimiter."""
    import importlib.util

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load((HARNESS_TASKS / f"wb_{task}.yaml").read_text(), Loader=Loader)
    spec = importlib.util.spec_from_file_location("wb_harness_utils", HARNESS_TASKS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(**config["dataset_kwargs"])["test"], config["target_delimiter"]


def _harness_pairs(doc, delimiter: str) -> list[tuple[str, str]]:
    """The requests the harness builds for one document: (context, target_delimiter + continuation)."""
    if "choices" in doc:
        return [(doc["query"], delimiter + choice) for choice in doc["choices"]]
    if "contexts" in doc:
        return [(context, delimiter + doc["continuation"]) for context in doc["contexts"]]
    return [(doc["context"], delimiter + doc["continuation"])]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("task", ["piqa", "arc_easy", "hellaswag", "winogrande", "lambada_openai", "siqa"])
def test_harness_requests_are_the_workbench_token_rows(task, kind):
    """The wb_* documents turned into requests and tokenized by the adapter give exactly the rows that
    ``workbench eval`` builds from the same file (texts, joining space, boundary merges, truncation)."""
    from workbench.tokenizer import load_tokenizer

    folder = "gpt2" if kind == "gpt2" else "bert-base-uncased"
    tokenizer = load_tokenizer(TokenizerConfig(kind=kind, path=f"${{data}}/tokenizers/{folder}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = read_task(task).items[:200]  # hellaswag: includes items mixing both joins
    docs, delimiter = _harness_task(task)
    for seq_len in (64, 2048):  # 64 truncates many contexts from the left
        encoded, _ = encode_items(items, tokenizer, seq_len)
        for item, doc in zip(encoded, docs.select(range(len(items)))):
            rows, starts = request_rows(tokenizer, _harness_pairs(doc, delimiter), seq_len)
            assert (rows, starts) == (item.rows, item.cont_start), (task, item.index, seq_len)


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    from conftest import make_config

    run_dir = tmp_path_factory.mktemp("harness") / "h-ar"
    config = make_config({"name": "h-ar", "trainer": SHORT, "scheduler": {"warmup": "2ba"}})
    train(config, run_dir=run_dir)
    return run_dir


def _workbench_item_scores(run_dir, task: str) -> list[dict[str, float]]:
    """Per item of the first LIMIT: the workbench scorer's choice log-likelihoods and acc/acc_norm (one item per
    batch through score_batch, the code that workbench eval and training evaluation run)."""
    from workbench.evaluation.checkpoint import load_run

    loaded = load_run(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = read_task(task)
    encoded, _ = encode_items([data.items[i] for i in _parity_items(task)], loaded.tokenizer,
                              loaded.config.data.seq_len)
    options = BatchOptions(task=task, schema=data.spec.schema, scorer="ar")
    out = []
    for item in encoded:
        batch = collate_items([item], options, pad_id=loaded.tokenizer.eos_id)
        sums = score_batch(loaded.model, batch)
        rows = Rows.from_lists(item.rows, item.cont_start, pad_id=loaded.tokenizer.eos_id)
        logprob = score_rows(loaded.model.net, rows, "ar", mask_id=loaded.model.mask_id, shifted=True, subs=True,
                             vocab_size=loaded.model.vocab_size).logprob.tolist()
        out.append({"index": item.index, "logprob": logprob,
                    **{key: float(value[0]) for key, value in sums.items() if key.startswith("acc")}})
    return out


@pytest.mark.slow
def test_harness_acc_and_acc_norm_equal_the_workbench_scorer_item_by_item(ar_run):
    chosen = {f"wb_{task}": _parity_items(task) for task in PARITY_TASKS}
    results = evaluate(str(ar_run), list(chosen), samples=chosen, log_samples=True, model_args={"device": "cpu"})
    assert results["workbench_model"].scorer == "ar"
    ties, compared = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}, {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for task in PARITY_TASKS:
        ours = _workbench_item_scores(ar_run, task)
        samples = sorted(results["samples"][f"wb_{task}"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == chosen[f"wb_{task}"] == [item["index"] for item in ours]
        for sample, item in zip(samples, ours):
            assert sample["doc"]["index"] == item["index"]
            harness_ll = [resp[0][0] for resp in sample["resps"]]
            assert harness_ll == pytest.approx(item["logprob"], rel=1e-6, abs=1e-6), (task, item["index"])
            choices = sample["doc"]["choices"]
            divisors = {"acc": [1] * len(choices), "acc_norm": [len(c) for c in choices],  # characters
                        "acc_bytes": [len(c.encode()) for c in choices]}
            for metric, divisor in divisors.items():
                if metric not in item:  # acc_bytes: only once the workbench reports it
                    continue
                normed = [ll / d for ll, d in zip(harness_ll, divisor)]
                if normed.count(max(normed)) > 1:  # exact tie (e.g. choices equal after truncation to the
                    ties[metric] += 1              # model length): harness takes the first, workbench a seeded one
                    continue
                assert sample[metric] == item[metric], (task, item["index"], metric)
                compared[metric] += 1
    total = sum(len(ids) for ids in chosen.values())
    for metric in ("acc", "acc_norm"):  # every item compared but the few exact ties
        assert compared[metric] + ties[metric] == total and ties[metric] <= total // 10, (compared, ties)


@pytest.mark.slow
def test_workbench_eval_harness_flag_and_the_harness_cli(ar_run, tmp_path, capsys):
    out = tmp_path / "harness.parquet"
    assert main(["eval", str(ar_run), "--harness", "wb_copa,wb_lambada_openai", "--limit", "6", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wb_copa" in printed and "scorer ar" in printed
    rows = read_metrics(out)
    copa = rows.filter(pl.col("split") == "wb_copa")
    assert set(copa["metric"].to_list()) >= {"acc", "acc_norm", "acc_stderr"}
    assert set(rows.filter(pl.col("split") == "wb_lambada_openai")["metric"].to_list()) >= {"perplexity", "acc"}
    assert (copa["step"] == 16).all()

    # the harness's own command line, with the model registered by name
    command = [sys.executable, "-m", "workbench.evaluation.harness", "--model", "workbench", "--model_args",
               f"run={ar_run},device=cpu", "--tasks", "wb_copa", "--limit", "6", "--output_path",
               str(tmp_path / "lm_eval_out")]
    # close_fds=False lets subprocess use posix_spawn: a plain fork of this many-threaded process (polars,
    # tokio, jemalloc threads) once left the child deadlocked before its exec
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, close_fds=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wb_copa" in done.stdout and "acc_norm" in done.stdout  # the harness's table
    (written,) = (tmp_path / "lm_eval_out").rglob("results_*.json")
    harness_copa = json.loads(written.read_text())["results"]["wb_copa"]
    for metric in ("acc", "acc_norm"):  # the same numbers through both entry points
        ours = copa.filter(pl.col("metric") == metric)["value"][0]
        assert harness_copa[f"{metric},none"] == pytest.approx(ours), metric


def test_unknown_harness_task_is_one_line_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"--harness: unknown harness task\(s\) wb_nope; the workbench's offline "
                       r"tasks: wb_arc_challenge"):
        evaluate(str(tmp_path / "no-such-run"), ["wb_nope"])


@pytest.mark.slow
def test_mdm_run_scores_with_the_mc_elbo(tiny_config, tmp_path):
    config = tiny_config({"name": "h-mdm", "objective": {"name": "mdm"}, "trainer": {"max_duration": "8ba",
                          "checkpoint_interval": "8ba"}, "scheduler": {"warmup": "2ba"}})
    train(config, run_dir=tmp_path / "h-mdm")
    lm = WorkbenchHarnessLM(str(tmp_path / "h-mdm"), device="cpu", samples=4)
    assert lm.scorer == "mc-elbo"
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " a small dog")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = lm.loglikelihood(requests)
    rows, starts = request_rows(lm.tokenizer, pairs, config.data.seq_len)
    keys = [zlib.crc32(context.encode()) & 0x7FFFFFFF for context, _ in pairs]  # the adapter's noise keys
    expected = score_rows(lm.model.net, Rows.from_lists(rows, starts, keys, pad_id=lm.tokenizer.eos_id),
                          "mc-elbo", mask_id=lm.model.mask_id, shifted=False, subs=True,
                          vocab_size=lm.model.vocab_size, samples=4, seed=1234).logprob.tolist()
    assert [s for s, _ in scores] == pytest.approx(expected)
    assert all(s < 0 for s, _ in scores)
    more = WorkbenchHarnessLM(str(tmp_path / "h-mdm"), device="cpu", samples=16).loglikelihood(requests)
    assert [s for s, _ in more] != [s for s, _ in scores]  # the samples setting reaches the estimator

    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("word " * 100,), 0)])
    assert len(rolling) == 1 and rolling[0] < 0  # two windows of the 64-token model
    text = lm.generate_until([Instance("generate_until", {}, ("The", {"until": ["\n"], "max_gen_toks": 8}), 0)])
    assert len(text) == 1 and "\n" not in text[0]
