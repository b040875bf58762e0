"""The kit's one typed configuration: a recipe (YAML shipped in the kit, or your own file) + dotted
command-line overrides -> validated dataclasses.

Names follow Hugging Face's ``TrainingArguments`` and the Korean guide the kit is built around, so a
value read in the guide (``per_device_train_batch_size = 8``) is written the same way here; the train
section's TrainingArguments fields reach TRL's SFTConfig by name (TrainConfig.training_arguments).
Everything is checked before any weights load (each section's module, then kit.config.schema), and every
problem is reported at once, with its file and line or override.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from kit.config.issue import Issue, closest
from kit.config.schema import Config, validation_issues
from kit.core.errors import ConfigError

RECIPES = Path(__file__).parents[1] / "recipes"  # the YAML recipes, shipped as package data
DEFAULT_RECIPE = "llama31_sft"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(recipe: str | os.PathLike) -> Path:
    """A recipe YAML file, or the name of a recipe shipped in the kit ('demo'). A path recipes/NAME.yaml
    that does not exist also names the shipped recipe, as commands written for a checkout do."""
    p = Path(recipe)
    if p.is_file():
        return p
    shipped = RECIPES / f"{p.stem}.yaml"
    if p.parent.name in ("", "recipes") and p.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    raise ConfigError(f"recipe file {p} does not exist. Pass --config with a YAML file or the name of a recipe "
                      f"shipped in the kit: {', '.join(shipped_recipes())}.")


@dataclass(frozen=True)
class Override:
    text: str
    keys: list[str]
    value: Any


def all_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += all_keys(f.default_factory, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value: Any, hint: Any, key: str, issues: list[Issue]) -> Any:
    """Check/convert one value against its type hint; the error names the key. A mapping for a dataclass (a
    source of data.path) is built by _build, which adds its problems to `issues`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}, "
                              f"got {value!r}.")
        return _build(hint, value, f"{key}.", issues)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key, issues)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"  # YAML 1.1 reads a bare `no` as false
        if value not in args:
            options = [str(a) for a in args]
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}.{closest(str(value), options)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}.")
        entries = []
        for i, v in enumerate(value):  # each entry's problem under its own key; an unreadable entry stays raw
            try:
                entries.append(_coerce(v, args[0], f"{key}[{i}]", issues))
            except ConfigError as e:
                issues.append(Issue(f"{key}[{i}]", str(e)))
                entries.append(v)
        return entries
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping like {{key: value}}, got {value!r}.")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", issues) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if hint in (int, float) and isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 2e-4 and 1e3 (no dot) as text, in a file as on the command line
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected a whole number, got {value!r}.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: {value} is not a finite number; give a number such as 1.0.")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}.")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {value!r}.")
    raise ConfigError(f"{key}: unsupported type {hint}.")  # pragma: no cover - a kit bug


def _build(cls, data: Any, prefix: str, issues: list[Issue]):
    """The dataclass from a mapping; every unknown key and bad value becomes an issue (and keeps its default)."""
    if not isinstance(data, dict):
        issues.append(Issue(prefix.rstrip("."), f"'{prefix.rstrip('.') or 'top level'}' must be a mapping, "
                                                f"got {data!r}."))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names and "=" in str(key):
            issues.append(Issue(full, f"key '{key}' looks like an override; write it as 'key: value' in YAML."))
        elif key not in names:
            valid = all_keys(cls, prefix) if prefix.endswith("].") else all_keys()  # a list's entry: its own keys
            issues.append(Issue(full, f"unknown key '{full}'.{closest(full, valid)}"))
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{full}.", issues)
        else:
            try:
                kwargs[key] = _coerce(value, hints[key], full, issues)
            except ConfigError as e:
                issues.append(Issue(full, str(e)))
    return cls(**kwargs)


def parse_override(text: str) -> Override:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.learning_rate=2e-4).")
    key, raw = text.split("=", 1)
    if control := [c for c in raw if unicodedata.category(c) == "Cc"]:
        # YAML folds a line break into a space: run.name=$'a\nb' would name the folder 'a b'
        raise ConfigError(f"override {text!r}: the value holds a line break or another control character "
                          f"({control[0]!r}). Give it on one line without control characters; multi-line text "
                          "belongs in the recipe file, as a YAML block (key: |).")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "unreadable"
        raise ConfigError(f"override '{text}': the value is not valid YAML ({problem}). Close its brackets and "
                          f"quotes, or put text in quotes: {key.strip()}=\"...\".") from None
    keys = key.strip().split(".")
    if len(keys) < 2:
        raise ConfigError(f"override '{text}': keys have a section, like train.{keys[0]}."
                          f"{closest(keys[0], all_keys())}")
    return Override(text, keys, value)


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return text.strip().lower() not in ("nan", "inf", "-inf", "infinity")
    except ValueError:
        return False


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Dotted key (a list's entries as key[i]) -> line of a YAML document, counted from 1 as editors do."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[prefix + str(k.value)] = k.start_mark.line + 1
            lines.update(_key_lines(v, f"{prefix}{k.value}."))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[f"{prefix[:-1]}[{i}]"] = v.start_mark.line + 1
            lines.update(_key_lines(v, f"{prefix[:-1]}[{i}]."))
    return lines


def _twice(node: Any, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """Keys written twice in one YAML mapping: (dotted key, first line, second line)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key, line = f"{prefix}{k.value}", k.start_mark.line + 1
            if key in seen:
                yield key, seen[key], line
            seen.setdefault(key, line)
            yield from _twice(v, f"{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _twice(v, f"{prefix[:-1]}[{i}].")


def load_config(recipe: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """A recipe (a YAML file or a shipped recipe's name; None: the defaults) plus dotted overrides, validated.
    Raises one ConfigError that lists every problem, each with its file and line or override."""
    data: dict = {}
    where: dict[str, str] = {}
    issues: list[Issue] = []
    if recipe is not None:
        p = recipe_path(recipe)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8.") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot be read ({e.strerror}).") from None
        try:
            data = yaml.safe_load(text) or {}
            node = yaml.compose(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"{p}{f', line {mark.line + 1}' if mark else ''}: not valid YAML "
                              f"({getattr(e, 'problem', None) or e}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a recipe is a mapping of sections (model:, lora:, train:, ...), got "
                              f"{type(data).__name__}.")
        where = {k: f"{p}, line {n}" for k, n in _key_lines(node).items()}
        issues += [Issue(key, f"'{key}' is set twice, on lines {first} and {second}; YAML would keep only the last. "
                              "Delete one.") for key, first, second in _twice(node)]
    for text in overrides:
        try:
            o = parse_override(text)
        except ConfigError as e:
            issues.append(Issue("", str(e)))
            continue
        node = data
        for i, k in enumerate(o.keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                issues.append(Issue("", f"override '{text}': '{k}' is not a section."))
                break
            where.setdefault(".".join(o.keys[:i + 1]), f"override '{text}'")
        else:
            node[o.keys[-1]] = o.value
            where[".".join(o.keys)] = f"override '{text}'"
    cfg = _build(Config, data, "", issues)
    unread = [i.key for i in issues if i.key]  # values that kept their default, list entries that stayed raw
    issues += [i for i in validation_issues(cfg) if not any(k == i.key or k.startswith(f"{i.key}[") for k in unread)]
    if issues:
        raise ConfigError(*[_located(i, where) for i in issues])
    return cfg


def _located(issue: Issue, where: dict[str, str]) -> str:
    key = issue.key
    while key and key not in where:
        cut = max(key.rfind("."), key.rfind("["))  # data.path[1].weight -> data.path[1] -> data.path
        key = key[:cut] if cut > 0 else ""
    return f"{where[key]}: {issue.message}" if key else issue.message


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
