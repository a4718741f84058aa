"""YAML as align reads it (recipes, overrides, task files): safe, with `1e-5` read as a number, duplicate keys
refused, and files read defensively (binary files and non-UTF-8 bytes are named, not a traceback)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlLoader(yaml.SafeLoader):
    """Safe YAML (no object tags) that reads `3e-4` as a number: PyYAML follows YAML 1.1, where a float
    needs a dot, so a learning rate written `3e-4` would otherwise arrive as the string "3e-4".

    A key written twice in one mapping is an error: YAML would silently keep the last one, so a recipe that
    sets `learning_rate` twice trains with a value its author may not have meant. Keys brought in by a merge
    (`<<: *defaults`) may still be overridden; that is what merges are for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
                if first is not None:
                    raise ConstructorError(
                        None,
                        None,
                        f"duplicate key `{key}` at line {key_node.start_mark.line + 1} (first at line {first}); "
                        "YAML would keep only the last one: remove one of them",
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_text_file(path: Path) -> str:
    """A text file's content as UTF-8, or ValueError saying why not (binary, or which bytes are not UTF-8)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise ValueError("a binary file, not YAML text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} (offset {e.start}); save the file as UTF-8"
        ) from None
