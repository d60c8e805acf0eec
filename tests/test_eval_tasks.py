"""Downstream task files: readers, malformed input, fixed subsets, tokenization boundaries, rows, batches, metrics."""

from __future__ import annotations

import gzip
import json
import math
import re
import warnings

import pytest
import torch

from workbench.config import ConfigError, DownstreamConfig, TokenizerConfig
from workbench.evaluation.tasks import (
    LANGUAGE_MODELING,
    MULTIPLE_CHOICE,
    SCHEMA,
    TASKS,
    BatchOptions,
    EncodedItem,
    TaskItem,
    TaskMetric,
    check_tasks,
    collate_items,
    encode_items,
    join_delimiter,
    metric_filter,
    prepare_task,
    read_task,
    select_items,
    split_items,
    split_tokens,
    task_metric_names,
)
from workbench.tokenizer import load_tokenizer

README_COUNTS = {  # /work/shared/data/README.md
    "hellaswag": 10042, "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "openbook_qa": 500, "siqa": 1954,
    "commonsense_qa": 1221, "copa": 100, "boolq": 3270, "winogrande": 1267, "winograd_wsc": 273,
    "lambada_openai": 5153,
}


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer(TokenizerConfig(kind="gpt2"))


@pytest.fixture(scope="module")
def bundled():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a malformed line in a bundled file fails the test
        return {name: read_task(name) for name in TASKS}


def _write_gz(path, lines: list[bytes]) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(b"\n".join(lines) + b"\n")


# --------------------------------------------------------------------------------------------------------------
# reading


def test_all_twelve_bundled_files_parse_completely(bundled):
    assert set(TASKS) == set(README_COUNTS)
    for name, data in bundled.items():
        assert len(data.items) == README_COUNTS[name] == data.lines, name
        assert not data.skipped
        for item in data.items:
            n = len(item.continuations)
            assert len(item.contexts) == n and 0 <= item.gold < n
            assert all(isinstance(text, str) and text.strip() for text in item.continuations)
            if TASKS[name].schema == MULTIPLE_CHOICE:
                assert n >= 2 and len(set(item.contexts)) == 1
            elif TASKS[name].schema == SCHEMA:
                assert n >= 2 and len(set(item.continuations)) == 1
            else:
                assert n == 1
        assert [item.index for item in data.items] == list(range(len(data.items)))


def test_malformed_lines_are_reported_with_file_and_line_and_skipped(tmp_path):
    good = {"query": "q", "choices": ["a", "b"], "gold": 1}
    lines = [
        json.dumps(good).encode(),                                # 1 ok
        b'{"query": "q", "choices": ["a", "b"], "gold": ',        # 2 truncated JSON
        json.dumps({**good, "gold": 5}).encode(),                 # 3 gold out of range
        json.dumps(["not", "an", "object"]).encode(),             # 4
        b'{"query": "\xff\xfe", "choices": ["a", "b"], "gold": 0}',  # 5 not UTF-8
        json.dumps({"query": "q", "gold": 0}).encode(),           # 6 no choices
        json.dumps({**good, "gold": True}).encode(),              # 7 boolean gold
        b"",                                                      # 8 blank: ignored silently
        json.dumps(good).encode(),                                # 9 ok
    ]
    path = tmp_path / "piqa.jsonl.gz"
    _write_gz(path, lines)
    with pytest.warns(UserWarning) as record:
        data = read_task("piqa", path)
    assert [item.index for item in data.items] == [0, 8]
    messages = [str(w.message) for w in record]
    expected = {2: "not valid JSON", 3: "'gold' must be an integer in [0, 2)", 4: "must be a JSON object",
                5: "not valid UTF-8", 6: "'choices' must be a list", 7: "'gold' must be an integer"}
    assert len(data.skipped) == len(expected)
    for (line, reason), skipped in zip(expected.items(), data.skipped):
        assert skipped.startswith(f"{path}:{line}: ") and reason in skipped, (line, skipped)
    assert [m for m in messages if m.endswith("line skipped")] == data.skipped[:5]  # first five warned one by one
    assert sum(f"{path}: 6 malformed lines skipped in total" in m for m in messages) == 1  # then a summary


def test_truncated_gzip_keeps_the_items_before_the_damage(tmp_path):
    path = tmp_path / "copa.jsonl.gz"
    record = {"query": "The man turned on the faucet, therefore", "choices": ["x" * 40, "y" * 40], "gold": 1}
    _write_gz(path, [json.dumps({**record, "query": f"{i} {record['query']} {i * 7919}"}).encode()
                     for i in range(2000)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"copa\.jsonl\.gz:\d+: file damaged"):
        task = read_task("copa", path)
    assert 0 < len(task.items) < 2000
    assert [item.index for item in task.items] == list(range(len(task.items)))


def test_missing_and_empty_files_are_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl.gz"))):
        read_task("piqa", tmp_path / "nope.jsonl.gz")
    empty = tmp_path / "empty.jsonl.gz"
    _write_gz(empty, [b""])
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*no valid item"):
        read_task("piqa", empty)


def test_check_tasks_names_the_bad_task_and_the_allowed_ones(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as err:
        check_tasks(["hellaswag", "hellaswagg"])
    assert err.value.key == "eval.downstream.tasks"
    assert "'hellaswagg'" in str(err.value) and "piqa" in str(err.value) and "lambada_openai" in str(err.value)
    with pytest.raises(ConfigError, match="listed twice"):
        check_tasks(["piqa", "piqa"])
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "eval" / "piqa.jsonl.gz")) + " not found"):
        check_tasks(["piqa"])


def test_training_rejects_a_bad_task_before_preparing_data(tiny_config, tmp_path, monkeypatch):
    from workbench.train import build_run

    monkeypatch.setenv("WORKBENCH_PREPARED", str(tmp_path / "prepared"))
    config = tiny_config({"name": "bad-task", "eval": {"downstream": {"tasks": ["piqa", "squad"]}}})
    with pytest.raises(ConfigError, match="unknown task 'squad'"):
        build_run(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "prepared").exists()


def test_downstream_config_fields(tiny_config):
    config = tiny_config({"eval": {"downstream": {
        "tasks": ["piqa", "lambada_openai"], "scorers": {"lambada_openai": "chain"}, "cfg_weight": 0.5,
        "masking": "bernoulli", "interval": "500ba", "scorer": "mc-elbo"}}})
    downstream = config.eval.downstream
    assert downstream.scorers == {"lambada_openai": "chain"} and downstream.interval == "500ba"
    assert tiny_config({"eval": {"downstream": {"tasks": ["piqa"]}}}).eval.downstream.interval is None
    with pytest.raises(ConfigError, match=r"eval\.downstream\.scorers\.hellaswag: is not one of the evaluated"):
        tiny_config({"eval": {"downstream": {"tasks": ["piqa"], "scorers": {"hellaswag": "ar"}}}})
    with pytest.raises(ConfigError, match=r"eval\.downstream\.scorers\.piqa: 'exact' is not allowed"):
        tiny_config({"eval": {"downstream": {"tasks": ["piqa"], "scorers": {"piqa": "exact"}}}})
    with pytest.raises(ConfigError, match=r"eval\.downstream\.cfg_weight: .*not to the ar scorer"):
        tiny_config({"eval": {"downstream": {"tasks": ["piqa"], "scorer": "ar", "cfg_weight": 1.0}}})
    with pytest.raises(ConfigError, match=r"eval\.downstream\.interval"):
        tiny_config({"eval": {"downstream": {"tasks": ["piqa"], "interval": "often"}}})


# --------------------------------------------------------------------------------------------------------------
# the fixed item subset


def test_item_subset_is_fixed_nested_and_robust_to_a_skipped_line(bundled):
    items = bundled["hellaswag"].items
    ids = [item.index for item in select_items(items, 100, 1234)]
    assert ids == [item.index for item in select_items(items, 100, 1234)] and len(ids) == 100
    assert ids == sorted(ids)
    assert set(ids) < {item.index for item in select_items(items, 300, 1234)}  # a smaller limit is a subset
    assert set(ids) != {item.index for item in select_items(items, 100, 99)}
    without_one = [item for item in items if item.index != ids[0]]  # as if that line were malformed
    assert len(set(ids) & {item.index for item in select_items(without_one, 100, 1234)}) == 99
    assert select_items(items, None, 0) == list(items) and select_items(items[:5], 10, 0) == items[:5]
    spread = torch.tensor(ids, dtype=torch.float)
    assert spread.mean() == pytest.approx(len(items) / 2, rel=0.2)  # spread over the file, not its head


# --------------------------------------------------------------------------------------------------------------
# tokenization boundaries


@pytest.mark.parametrize(("context", "continuation", "delimiter"), [
    ("The cat sat on the", "mat.", " "),
    ("Question: dresser\n", "replace drawer", ""),  # after whitespace
    ("he", ", then walks away", ""),  # before closing punctuation
    ("Sarah was a better surgeon than Maria so Sarah", ".", ""),
    ("", "first", ""),
    ("a", " b", ""),  # the continuation brings its own space
    ("He said", '"hello"', " "),  # an opening quote keeps the space
])
def test_join_delimiter(context, continuation, delimiter):
    assert join_delimiter(context, continuation) == delimiter


def test_continuation_tokens_are_exactly_the_scored_text(gpt2):
    contexts = ["The cat sat on the", "Question: dresser\n", "x\n\n", "a relative, etc."]
    continuations = ["mat", "replace drawer", "word", "): Date of birth"]
    (c0, x0, m0), (c1, x1, _), (c2, x2, m2), (c3, x3, m3) = split_tokens(gpt2, contexts, continuations)
    assert c0 == gpt2.encode("The cat sat on the") and x0 == gpt2.encode(" mat") and not m0  # leading space scored
    assert gpt2.decode(x1) == "replace drawer" and c1 + x1 == gpt2.encode("Question: dresser\nreplace drawer")
    # "\n\n" is one token alone but two before "word": the joint tokenization wins, the boundary token is scored
    assert m2 and c2 + x2 == gpt2.encode("x\n\nword") and gpt2.decode(c2) == "x" and gpt2.decode(x2) == "\n\nword"
    assert m3 and gpt2.decode(x3) == ".): Date of birth" and c3 + x3 == gpt2.encode("a relative, etc.): Date of birth")


def test_bundled_rows_match_the_joint_tokenization(bundled, gpt2):
    for name, data in bundled.items():
        items = data.items[:150]
        contexts = [c for item in items for c in item.contexts]
        continuations = [x for item in items for x in item.continuations]
        pairs = split_tokens(gpt2, contexts, continuations)
        merged = 0
        for (ctx, cont, merge), context, continuation in zip(pairs, contexts, continuations):
            text = context + join_delimiter(context, continuation) + continuation
            assert ctx + cont == gpt2.encode(text), name
            if merge:
                merged += 1
                assert gpt2.decode(cont).endswith(continuation)
            else:
                assert gpt2.decode(cont) == join_delimiter(context, continuation) + continuation, name
        assert merged <= 0.02 * len(pairs), name


def test_rows_truncate_the_context_from_the_left_and_count_it(gpt2):
    eos = gpt2.eos_id
    long_context = ("one two three " * 20).strip()
    long_item = TaskItem(0, [long_context], ["and the end"], 0)
    short_item = TaskItem(1, ["Hello there"], ["friend"], 0)
    cont = gpt2.encode(" and the end")
    (long_enc, short_enc), stats = encode_items([long_item, short_item], gpt2, seq_len=16)
    row = long_enc.rows[0]
    assert len(row) == 16 and row[-len(cont):] == cont and long_enc.cont_start[0] == 16 - len(cont)
    assert row[:long_enc.cont_start[0]] == gpt2.encode(long_context)[-(16 - len(cont)):]  # left-truncated
    assert long_enc.truncated and not short_enc.truncated and stats.context_truncated == 1
    assert short_enc.rows[0] == [eos, *gpt2.encode("Hello there"), *gpt2.encode(" friend")]
    assert short_enc.cont_start == [1 + len(gpt2.encode("Hello there"))]
    assert short_enc.cont_bytes == [len(b"friend")] and short_enc.cont_chars == [len("friend")]
    fit = TaskItem(2, ["Hello there"], ["friend"], 0)  # exactly seq_len + 1 with EOS: only the EOS marker goes
    (fit_enc,), fit_stats = encode_items([fit], gpt2, seq_len=len(short_enc.rows[0]) - 1)
    assert fit_enc.rows[0] == short_enc.rows[0][1:] and not fit_enc.truncated and fit_stats.context_truncated == 0
    huge = TaskItem(3, ["ctx"], ["word " * 40], 0)  # continuation longer than seq_len - 1: first tokens kept
    (huge_enc,), huge_stats = encode_items([huge], gpt2, seq_len=8)
    assert huge_enc.rows[0] == [*gpt2.encode("ctx"), *gpt2.encode(" " + "word " * 40)[:7]]  # EOS gives way
    assert huge_enc.cont_start == [1] and huge_enc.truncated
    assert huge_stats.continuation_truncated == 1 and huge_stats.context_truncated == 0


def test_continuation_lengths_count_characters_and_bytes_separately(gpt2):
    """acc_norm divides by characters (lm-evaluation-harness), acc_bytes by UTF-8 bytes: they differ on non-ASCII
    text. The joining space is not counted (the harness's len(choice))."""
    item = TaskItem(0, ["The dish is a", "The dish is a"], ["crème brûlée", "cake"], 0)
    (encoded,), _ = encode_items([item], gpt2, seq_len=64)
    assert encoded.cont_chars == [12, 4] and encoded.cont_bytes == [15, 4]


def test_prepare_task_reports_truncation(gpt2):
    task = prepare_task("boolq", gpt2, DownstreamConfig(tasks=["boolq"], limit=20), seq_len=64)
    assert len(task.items) == 20 and task.available == README_COUNTS["boolq"]
    assert task.stats.context_truncated > 0 and "truncated to the model length" in task.describe()
    assert all(len(row) <= 64 for item in task.items for row in item.rows)


# --------------------------------------------------------------------------------------------------------------
# batches and metrics


def test_collate_pads_item_major_and_splits_along_items():
    items = [EncodedItem(7, [[0, 5, 6], [0, 5, 7, 8]], [2, 2], [3, 5], [3, 4], 1, False),
             EncodedItem(9, [[0, 4], [0, 4], [0, 3, 3, 3, 3], [0, 9]], [1, 1, 1, 1], [1, 1, 0, 2], [1, 1, 0, 2], 2,
                         True)]
    options = BatchOptions(task="piqa", schema=MULTIPLE_CHOICE, scorer="chain", samples=3)
    batch = collate_items(items, options, pad_id=99)
    assert batch["tokens"].shape == (2, 4, 5)
    assert batch["tokens"][0, 1].tolist() == [0, 5, 7, 8, 99] and batch["tokens"][0, 3].tolist() == [99] * 5
    assert batch["length"].tolist() == [[3, 4, 0, 0], [2, 2, 5, 2]]
    assert batch["choice_valid"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["cont_start"][1].tolist() == [1, 1, 1, 1] and batch["cont_bytes"][1, 2] == 1  # bytes >= 1
    assert batch["cont_chars"][0].tolist() == [3, 4, 1, 1] and batch["cont_chars"][1, 2] == 1
    assert batch["gold"].tolist() == [1, 2] and batch["item"].tolist() == [7, 9]
    assert batch["truncated"].tolist() == [False, True]
    assert batch["task"] == "piqa" and batch["scorer"] == "chain" and batch["samples"] == 3
    first, second = split_items(batch, 1)
    assert first["tokens"].shape == (1, 4, 5) and second["gold"].tolist() == [2] and second["scorer"] == "chain"
    assert split_items(batch, 8) == [batch]


def test_task_metrics_compute_from_device_sums():
    acc, stderr, ppl = TaskMetric("acc"), TaskMetric("stderr"), TaskMetric("ppl")
    for metric in (acc, stderr):
        metric.update(torch.tensor(3.0), torch.tensor(4.0))
        metric.update(torch.tensor(1.0), torch.tensor(4.0))
    assert float(acc.compute()) == 0.5
    assert float(stderr.compute()) == pytest.approx(math.sqrt(0.25 / 7))
    ppl.update(torch.tensor(6.0), torch.tensor(3.0))
    assert float(ppl.compute()) == pytest.approx(math.exp(2.0))
    single = TaskMetric("stderr")
    single.update(torch.tensor(1.0), torch.tensor(1.0))
    assert math.isnan(float(single.compute()))
    with pytest.raises(ValueError, match="unknown task metric"):
        TaskMetric("f1")


def test_metric_names_and_anchored_filters():
    assert task_metric_names(LANGUAGE_MODELING, "ar") == ["acc", "stderr", "ppl", "truncated"]
    assert task_metric_names(SCHEMA, "auto") == ["acc", "acc_norm", "acc_bytes", "stderr", "elbo_stderr",
                                                 "truncated"]
    from composer.trainer.trainer import _filter_metrics

    metrics = {name: TaskMetric(name) for name in TaskMetric.KINDS}
    metrics["ar_nll"] = TaskMetric("acc")  # stand-in for the validation metric
    assert set(_filter_metrics(metrics, metric_filter(["acc", "stderr"]))) == {"acc", "stderr"}  # not acc_norm
    assert set(_filter_metrics(metrics, ["ar_nll"])) == {"ar_nll"}  # the val evaluator sees no task metric


def test_task_evaluators_one_per_task_and_scorer_checks(gpt2, tiny_config):
    from workbench.evaluation.tasks import build_task_evaluators
    from workbench.train import build_model

    mdm = build_model(tiny_config({"objective": {"name": "mdm"}}), gpt2, install_objective=True)
    lines: list[str] = []
    cfg = DownstreamConfig(tasks=["copa", "lambada_openai"], limit=4, interval="100ba")
    evaluators = build_task_evaluators(mdm, gpt2, cfg, "1ep", 64, log=lines.append, objective="mdm")
    assert [e.label for e in evaluators] == ["copa", "lambada_openai"]
    assert evaluators[1].metric_names == ["^acc$", "^stderr$", "^ppl$", "^elbo_stderr$", "^truncated$"]
    assert set(mdm.extra_metrics) == {"acc", "acc_norm", "acc_bytes", "stderr", "ppl", "elbo_stderr", "truncated"}
    assert lines[0].startswith("[eval] copa: 4 of 100 items (seed 1234)")
    with pytest.raises(ConfigError, match=r"eval\.downstream\.scorer: the ar scorer needs a next-token"):
        build_task_evaluators(mdm, gpt2, DownstreamConfig(tasks=["copa"], scorer="ar"), "1ep", 64, objective="mdm")
    ar = build_model(tiny_config({}), gpt2, install_objective=True)
    with pytest.raises(ConfigError, match=r"eval\.downstream\.scorers\.copa: the pll scorer needs a masked-diff"):
        build_task_evaluators(ar, gpt2, DownstreamConfig(tasks=["copa"], scorers={"copa": "pll"}), "1ep", 64,
                              objective="ar")
