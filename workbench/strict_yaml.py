"""YAML as the workbench reads it: PyYAML's safe loader, except that a key written twice in one mapping is an
error instead of silently keeping the last value (``seed: 1`` then ``seed: 2``; a variant name written twice
under ``variants:``), and errors fit on one line.

PyYAML has no switch for duplicate keys (its constructor overwrites them) and ruamel.yaml, which refuses them,
would be a second YAML library for one check; so the composed node tree is walked once before construction,
which also gives each duplicate its dotted key and line numbers."""

from __future__ import annotations

from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ValueError):
    """``key`` (dotted, relative to the document) appears on ``line`` after first appearing on ``first_line``."""

    def __init__(self, key: str, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"{key}: duplicate key on line {line} (first on line {first_line})")


def _check_unique(node: yaml.Node, prefix: str, seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias to a node already walked (also stops recursive structures)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                _check_unique(value_node, prefix, seen_nodes)
                continue
            dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            identity = (key_node.tag, key_node.value)
            if identity in first:
                raise DuplicateKeyError(dotted, line, first[identity])
            first[identity] = line
            _check_unique(value_node, dotted, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique(item, f"{prefix}[{i}]", seen_nodes)


def load(text: str) -> Any:
    """Parse one YAML document like ``yaml.safe_load``, raising :class:`DuplicateKeyError` for a repeated key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def describe_error(err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: where (line, column) and what, without PyYAML's multi-line excerpt."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML{where}: {problem}" + (f" ({context})" if context else "")
