"""Dataset loader for the workbench's harness task YAMLs (``custom_dataset: !function utils.load``).

Each YAML reads one bundled task file (``<data>/eval/<task>.jsonl.gz``, the folder ``WORKBENCH_DATA`` or
``../shared/data`` names) through the workbench's own reader, so the harness sees exactly the items, texts and
gold answers of ``workbench eval``; nothing is downloaded. Each request is the workbench's text, split where the
workbench splits it: the harness's context is the workbench's context, and the joining text the workbench puts
between them (:func:`workbench.evaluation.tasks.join_delimiter`: a space, or nothing after whitespace or before
closing punctuation) starts the continuation, as the harness's ``target_delimiter`` does:

- arc_easy, arc_challenge, openbook_qa, siqa, commonsense_qa, copa, boolq join every row with a space, piqa
  with nothing (its questions end in a newline): the YAML's ``target_delimiter`` says so (checked on load) and
  the choices are the file's, so ``acc_norm`` divides by the same characters as ``workbench eval``.
- hellaswag joins 554 of its 40,168 rows without a space (102 items mix both), so each choice carries its own
  joining text and ``target_delimiter`` is empty: the same tokens and ``acc``, but the harness's ``acc_norm``
  counts the joining space as one more character of the choice.
- winogrande, winograd_wsc (one continuation after each context option, the harness's multiple-input form) and
  lambada_openai: the joining text starts the continuation; their metrics do not depend on its length.
"""

from __future__ import annotations

from typing import Any


def load(task: str, delimiter: str | None = None, **_: Any):
    """A DatasetDict with one ``test`` split holding the task's items in file order.

    ``delimiter``: the YAML's ``target_delimiter`` when every row of the task joins that way (checked here, so
    a YAML cannot silently disagree with the file); None: each continuation carries its own joining text and
    the YAML's ``target_delimiter`` is empty."""
    import datasets

    from workbench.evaluation.tasks import LANGUAGE_MODELING, SCHEMA, join_delimiter, read_task

    data = read_task(task)
    docs: list[dict[str, Any]] = []
    for item in data.items:
        delims = [join_delimiter(c, x) for c, x in zip(item.contexts, item.continuations)]
        if delimiter is not None:
            if any(d != delimiter for d in delims):
                raise ValueError(f"{data.path}: item {item.index} joins context and continuation with "
                                 f"{delims!r}, not the YAML's target_delimiter {delimiter!r}")
            delims = [""] * len(delims)  # the harness adds it
        if data.spec.schema == SCHEMA:
            if len(set(delims)) != 1:
                raise ValueError(f"{data.path}: item {item.index}: options join the continuation differently")
            docs.append({"index": item.index, "contexts": list(item.contexts),
                         "continuation": delims[0] + item.continuations[0], "gold": item.gold})
        elif data.spec.schema == LANGUAGE_MODELING:
            docs.append({"index": item.index, "context": item.contexts[0],
                         "continuation": delims[0] + item.continuations[0], "gold": 0})
        else:
            docs.append({"index": item.index, "query": item.contexts[0],
                         "choices": [d + x for d, x in zip(delims, item.continuations)], "gold": item.gold})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
