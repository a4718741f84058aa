"""Recipe schema, `extends:` composition, `a.b.c=value` overrides and validation.

The schema is `align.spec`'s shared pieces plus each registered stage type's spec (`align.stages.registry`);
trainer arguments are checked against the stage's trainer config class instead of being re-declared.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from align.errors import RecipeError, did_you_mean
from align.spec import AdapterSpec, DatasetSpec, LaunchSpec, ModelSpec, RecipeSpec
from align.stages.registry import BY_NAME, STAGE_TYPES, STAGES, stage_of
from align.trl_compat import check_trainer_args
from align.yamlio import load_yaml_text, read_text_file

STAGE_UNION = Union[tuple(s.spec for s in STAGES)]  # noqa: UP007 - built from the registry at run time
StageUnion = Annotated[STAGE_UNION, Field(discriminator="type")]
__all__ = ["AdapterSpec", "DatasetSpec", "LaunchSpec", "ModelSpec", "Recipe", "STAGE_TYPES", "load_recipe"]


class Recipe(RecipeSpec):
    stages: list[StageUnion] = Field(min_length=1)  # type: ignore[assignment]

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name_or_path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _links(self) -> Recipe:
        """Cross-field checks: unique names, known datasets, `from` pointing backwards, each type's own links."""
        problems: list[tuple[str, str]] = []
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            where = f"stages[{i}]({st.name})"
            kind = stage_of(st)
            if st.name in seen or st.name == "base":
                problems.append((f"{where}.name", f"`{st.name}` is used twice or reserved; names must be unique"))
            if st.source is not None and st.source != "base" and st.source not in seen:
                problems.append(
                    (
                        f"{where}.from",
                        f"`{st.source}` is not an earlier stage{did_you_mean(st.source, seen + ['base'])}",
                    )
                )
            for ref, field in kind.dataset_refs(st):
                if ref not in self.datasets:
                    hint = did_you_mean(ref, self.datasets) or f"; defined: {', '.join(self.datasets) or 'none'}"
                    problems.append((f"{where}.{field}", f"unknown dataset `{ref}`{hint}"))
            source_kind = stage_of(self.stage(st.source)) if st.source in seen else None
            if source_kind is not None and kind.source_must_be_policy and not source_kind.produces_policy:
                problems.append(
                    (f"{where}.from", f"`{st.source}` is a `{self.stage(st.source).type}` stage, not a policy model")
                )
            problems += kind.links(self, st, where, stage_of)
            seen.append(st.name)
        if problems:
            raise RecipeError(problems)
        return self


# ---------------------------------------------------------------- loading, extends, overrides


def _load_yaml(path: Path, via: str = "") -> dict[str, Any]:
    """One recipe file as a mapping; `via` says which file's `extends:` named it, for the message."""
    where = f"{path}{via}"
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", "recipe")
    try:
        data = load_yaml_text(read_text_file(path))
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot read the recipe: {e}", where) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {e}", where) from None
    if not isinstance(data, dict):
        got = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(
            f"a recipe must be a mapping of keys (name, model, datasets, stages); this file is {got}", where
        )
    return data


def deep_merge(base: Any, over: Any) -> Any:
    """Merge `over` into `base`: mappings recursively; lists of named mappings by `name`."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if _named_list(base) and _named_list(over):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in over:
            if item["name"] in index:
                out[index[item["name"]]] = deep_merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(over)


def _named_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in x)


def _resolve_extends(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"`extends` loops: {' -> '.join(p.name for p in chain + (path,))}", "extends")
    via = f" (named by `extends:` in {chain[-1].name})" if chain else ""
    data = _load_yaml(path, via)
    parent = data.pop("extends", None)
    _absolutize_paths(data, path.parent)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError("must be a path to another recipe", "extends")
    try:
        parent_path = (path.parent / parent).resolve()
    except (OSError, ValueError) as e:
        raise RecipeError(f"not a usable path ({e})", f"{path.name}: extends") from None
    if not parent_path.is_file():
        raise RecipeError(f"recipe to extend not found: {parent_path}", "extends")
    return deep_merge(_resolve_extends(parent_path, chain + (path,)), data)


def _absolutize_paths(data: dict[str, Any], root: Path) -> None:
    """Relative dataset paths are relative to the recipe file that names them, so `extends` works anywhere."""
    datasets = data.get("datasets")
    for spec in datasets.values() if isinstance(datasets, dict) else []:  # other shapes: the schema says why
        if isinstance(spec, dict):
            for key in ("path", "eval_path"):
                p = spec.get(key)
                if isinstance(p, str) and (p.startswith(".") or "/" in p) and not Path(p).is_absolute():
                    cand = root / p
                    if cand.exists() or p.startswith("."):
                        spec[key] = str(cand.resolve())
    stages = data.get("stages")
    for st in stages if isinstance(stages, list) else []:
        if isinstance(st, dict) and isinstance(st.get("type"), str) and st["type"] in BY_NAME:
            for key in BY_NAME[st["type"]].path_fields:  # a stage type's own fields that name files
                if isinstance(st.get(key), str) and st[key].startswith("."):
                    st[key] = str((root / st[key]).resolve())
    model = data.get("model")
    if isinstance(model, str) and model.startswith("."):
        data["model"] = str((root / model).resolve())
    elif isinstance(model, dict):
        for key in ("name_or_path", "chat_template"):
            p = model.get(key)
            if isinstance(p, str) and p.startswith("."):
                model[key] = str((root / p).resolve())


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides. Values are YAML; list items may be named (`stages.sft.train.max_steps=5`).

    The tree is copied node by node first: a YAML anchor/alias shares one node between several places, and
    an override of one place must not change the others (`copy.deepcopy` would keep them shared)."""
    data = _unshared(data)
    for ov in overrides:
        if "=" not in ov:
            raise RecipeError(f"`{ov}` is not of the form key.path=value", "override")
        key, raw = ov.split("=", 1)
        if not key.strip() or any(not part.strip() for part in key.split(".")):
            raise RecipeError(
                f"`{ov}` has an empty key (or an empty part between dots); write e.g. stages.sft.train.max_steps=5",
                "override",
            )
        try:
            value = load_yaml_text(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(node, list):
                idx = _list_index(node, part, key)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if part == "model" and isinstance(node.get(part), str):
                        node[part] = {"name_or_path": node[part]}
                    node = node.setdefault(part, {})
            else:
                raise RecipeError(f"`{'.'.join(parts[:j])}` is a value, not a section", f"override {key}")
    return data


def _unshared(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _unshared(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshared(v) for v in x]
    return copy.copy(x)


def _list_index(node: list[Any], part: str, key: str) -> int:
    if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
        return int(part)
    names = [x.get("name") for x in node if isinstance(x, dict)]
    if part in names:
        return names.index(part)
    raise RecipeError(f"no list item `{part}`{did_you_mean(part, [n for n in names if n])}", f"override {key}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, compose, override and validate a recipe; every problem is reported at once."""
    data = apply_overrides(_resolve_extends(Path(path)), overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_explain(e, data) + _raw_train_problems(data)) from None
    problems = []
    for i, st in enumerate(recipe.stages):
        problems += stage_of(st).check_args(st, f"stages[{i}]({st.name})")
    if problems:
        raise RecipeError(problems)
    return recipe


def _raw_train_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Trainer-argument problems too, when the schema already failed, so every error is reported at once."""
    out = []
    stages = data.get("stages")
    for i, st in enumerate(stages if isinstance(stages, list) else []):
        if (
            isinstance(st, dict)
            and isinstance(st.get("type"), str)
            and st["type"] in BY_NAME
            and isinstance(st.get("train"), dict)
        ):
            cls = BY_NAME[st["type"]].trainer_config
            if cls is not None:
                out += check_trainer_args(st["train"], cls, f"stages[{i}]({st.get('name')}).train")
    return out


def _explain(err: ValidationError, data: dict[str, Any]) -> list[tuple[str, str]]:
    """Turn pydantic's errors into (path, message) pairs with hints for typos."""
    out: list[tuple[str, str]] = []
    unions: dict[str, tuple[Any, list[str]]] = {}  # a value no member of a union took: one message, not one per member
    for e in err.errors():
        loc = list(e["loc"])
        if e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), RecipeError):
            out += e["ctx"]["error"].problems
            continue
        union_at = _union_member(loc, data)
        if union_at is not None:
            path, value, member = union_at
            if path not in unions:
                unions[path] = (value, [])
                out.append((path, ""))  # filled in below, in the order the errors came
            if member not in unions[path][1]:
                unions[path][1].append(member)
            continue
        # drop pydantic's discriminator tag from the location (stages.0.sft.train -> stages[0].train)
        clean: list[Any] = []
        node: Any = data
        for part in loc:
            if isinstance(node, list) and isinstance(part, int) and part < len(node):
                name = node[part].get("name") if isinstance(node[part], dict) else None
                clean.append(f"[{part}]({name})" if name else f"[{part}]")
                node = node[part]
                continue
            if isinstance(node, dict) and part not in node and part in STAGE_TYPES:
                continue
            clean.append(f".{part}")
            node = node.get(part) if isinstance(node, dict) else None
        path = "".join(str(c) for c in clean).lstrip(".")
        kind = e["type"]
        if kind == "extra_forbidden":
            owner = _owner_fields(loc[:-1], data)
            out.append((path, f"unknown key{did_you_mean(loc[-1], owner)}; valid keys: {', '.join(owner)}"))
        elif kind == "union_tag_invalid":
            got = e.get("ctx", {}).get("tag")
            out.append(
                (
                    path + ".type",
                    f"unknown stage type `{got}`{did_you_mean(got, STAGE_TYPES)}; known: {', '.join(STAGE_TYPES)}",
                )
            )
        elif kind == "union_tag_not_found":
            out.append((path + ".type", f"missing; one of: {', '.join(STAGE_TYPES)}"))
        elif kind == "missing":
            out.append((path, "required field is missing"))
        else:
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            out.append((path, f"{e['msg']}{shown}"))
    for i, (path, msg) in enumerate(out):
        if not msg and path in unions:
            value, members = unions[path]
            kinds = " or ".join(dict.fromkeys(MEMBER_WORDS.get(m, m) for m in members))
            out[i] = (path, f"must be {kinds} (got {_shown(value)})")
    return out


MEMBER_WORDS = {
    "str": "a name (string)",
    "list[str]": "a list of names",
    "dict[str,float]": "a mapping of names to mixture weights",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "none": "null",
}


def _shown(value: Any) -> str:
    if isinstance(value, dict | list):
        return f"a {type(value).__name__}"
    return repr(value)


def _union_member(loc: list[Any], data: dict[str, Any]) -> tuple[str, Any, str] | None:
    """(field path, the value, the member's name) where pydantic's location runs through a member of a plain union
    (`data: 5` fails `str`, `list[str]` and `dict[str,float]`: three errors for one field)."""
    node: Any = data
    path = ""
    for part in loc:
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            name = node[part].get("name") if isinstance(node[part], dict) else None
            path += f"[{part}]({name})" if name else f"[{part}]"
            node = node[part]
            continue
        if isinstance(node, dict) and part in node:
            path += f".{part}"
            node = node[part]
            continue
        if isinstance(node, dict) and part in STAGE_TYPES:
            continue
        if isinstance(part, str) and (part in MEMBER_WORDS or "[" in part):
            return path.lstrip("."), node, part
        return None
    return None


def _owner_fields(loc: list[Any], data: dict[str, Any]) -> list[str]:
    """The valid field names at a pydantic error location, to suggest the closest one for a typo."""
    t: Any = Recipe
    for part in loc:
        t = _step(t, part)
    return [f.alias or n for n, f in t.model_fields.items()] if _is_model(t) else []


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _step(t: Any, part: Any) -> Any:
    """Follow one location part through the schema's annotations (models, lists, dicts, unions)."""
    while get_origin(t) is Annotated:
        t = get_args(t)[0]
    if _is_model(t):
        field = t.model_fields.get(part)
        return field.annotation if field else t
    origin, args = get_origin(t), get_args(t)
    if origin is list:
        return args[0]
    if origin is dict:
        return args[1]
    members = [a for a in args if _is_model(a) or get_origin(a) is not None]
    for m in members:  # a discriminated union: the location names the tag
        if _is_model(m) and "type" in m.model_fields and part in get_args(m.model_fields["type"].annotation):
            return m
    return _step(members[0], part) if members else t
