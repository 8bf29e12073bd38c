"""Command-line overrides: ``a.b=value`` (YAML-typed), ``a.b=null``, ``~a.b`` (back to the default).

Keys are checked against the stage schema before anything is validated, so a typo is reported
with the closest existing key ("did you mean train.max_steps?").
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from smpo_cli.errors import RecipeError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
REMOVE = object()  # marker: delete the key so the schema default applies


@dataclass(frozen=True)
class Override:
    key: str
    value: Any  # REMOVE for ``~key``
    token: str


def parse_value(text: str) -> Any:
    """YAML-typed value: ``3`` -> 3, ``1e-5`` -> 1e-05, ``[a,b]`` -> list, ``null`` -> None."""
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 1e-5 as a string (no dot); users mean a number.
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value) else value
        except ValueError:
            return value
    return value


def parse_overrides(tokens: list[str]) -> list[Override]:
    """Parse ``KEY=VALUE`` / ``~KEY`` tokens; all malformed tokens are reported together."""
    parsed: list[Override] = []
    problems: list[str] = []
    for token in tokens:
        if token.startswith("--"):
            body = token[2:].split("=", 1)[0]
            problems.append(f"{token!r}: recipe keys are set as KEY=VALUE, e.g. {body}=VALUE (no leading --)")
            continue
        if token.startswith("~"):
            key = token[1:]
            if not _KEY.match(key):
                problems.append(f"{token!r}: expected ~dotted.key")
                continue
            parsed.append(Override(key, REMOVE, token))
            continue
        if "=" not in token:
            problems.append(f"{token!r}: expected KEY=VALUE (for example train.max_steps=10)")
            continue
        key, raw = token.split("=", 1)
        key = key.strip()
        if not _KEY.match(key):
            problems.append(f"{token!r}: {key!r} is not a dotted key (letters, digits, _ and .)")
            continue
        parsed.append(Override(key, parse_value(raw), token))
    if problems:
        raise RecipeError("invalid override(s):", problems)
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[Override]) -> dict[str, Any]:
    """Return a copy of ``data`` with the overrides applied in order."""
    out = _deep_copy(data)
    for ov in overrides:
        parts = ov.key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                if ov.value is REMOVE:
                    break
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(
                    f"cannot set {ov.key}: {'.'.join(parts[: i + 1])} is a value, not a block",
                    hint=f"set {'.'.join(parts[: i + 1])}=... instead",
                )
            node = child
        else:
            if ov.value is REMOVE:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = ov.value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# ----------------------------------------------------------------------------- schema key checks
def _block_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic block inside ``Block``, ``Block | None`` or ``Annotated[Block, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _block_type(arg)
            if found is not None:
                return found
    return None


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a recipe of this schema may set (blocks and leaves)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _block_type(field.annotation)
        if sub is not None:
            keys.extend(schema_keys(sub, dotted + "."))
    return keys


def suggest(key: str, candidates: list[str]) -> str | None:
    """The closest candidate, matching on the full dotted key or on its last part."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = [c for c in candidates if difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1]], cutoff=0.8)]
    return by_leaf[0] if len(by_leaf) == 1 else None


def unknown_key_problems(data: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Unknown keys anywhere in ``data``, each with a did-you-mean where one is close."""
    if not isinstance(data, dict):
        return []
    problems: list[str] = []
    fields = model.model_fields
    all_keys = schema_keys(model, prefix)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str):
            problems.append(f"{dotted}: keys must be strings")
            continue
        if key not in fields:
            hint = suggest(dotted, all_keys)
            problems.append(f"{dotted}: unknown key" + (f" (did you mean {hint}?)" if hint else ""))
            continue
        sub = _block_type(fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            problems.extend(unknown_key_problems(value, sub, dotted + "."))
    return problems


def free_form_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of dict-typed fields, whose sub-keys are free (e.g. reward.options)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _block_type(field.annotation)
        if sub is not None:
            keys.extend(free_form_keys(sub, dotted + "."))
        elif typing.get_origin(field.annotation) is dict:
            keys.append(dotted)
    return keys


def check_override_keys(overrides: list[Override], model: type[BaseModel]) -> list[str]:
    known = set(schema_keys(model))
    free = tuple(k + "." for k in free_form_keys(model))
    all_keys = sorted(known)
    problems = []
    for ov in overrides:
        if ov.key not in known and not ov.key.startswith(free):
            hint = suggest(ov.key, all_keys)
            problems.append(f"{ov.token}: unknown key {ov.key}" + (f" (did you mean {hint}?)" if hint else ""))
    return problems
