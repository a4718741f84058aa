"""YAML as align reads it (recipes, overrides, task files): safe, with `1e-5` read as a number."""

from __future__ import annotations

import re
from typing import Any

import yaml


class YamlLoader(yaml.SafeLoader):
    """Safe YAML (no object tags) that reads `3e-4` as a number: PyYAML follows YAML 1.1, where a float
    needs a dot, so a learning rate written `3e-4` would otherwise arrive as the string "3e-4"."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
