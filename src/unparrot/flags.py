"""Typed configs as command lines: the one helper that turns a config dataclass into argparse arguments.

Each public function's options live in one dataclass next to it (`ClusterConfig` beside `cluster()`), and
the function's signature defaults read that dataclass (`pca_dim: int = ClusterConfig.pca_dim`), so every
default is written once. The CLI generates its flags from the same dataclass: flag name = field name,
help from the field's metadata, and flags default to None (= not given), so a default shown in --help is
the dataclass's and nothing else. Old flag spellings stay working as hidden aliases.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import yaml

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, aliases: tuple[str, ...] = (), **meta) -> Any:
    """A config field with its help text (and CLI details) in the field's metadata.

    `aliases`: old flag spellings, accepted but hidden from --help. Other metadata: `positional` (an
    argparse positional), `nargs`, `action` ("append"), `item` (a parser applied to each value),
    `convert` (applied to the parsed value, e.g. `dict`), `metavar`, `choices`, `short` (e.g. "-n").
    A list or dict default becomes a default_factory."""
    meta = {"help": help, "aliases": tuple(aliases), **meta}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def key_values(help: str, *, aliases: tuple[str, ...] = ()) -> Any:
    """A repeatable `--flag KEY=VALUE` field, collected into a dict (None when not given)."""
    return option(None, help, aliases=aliases, action="append", item=key_value, convert=dict, metavar="KEY=VALUE")


def named_paths(help: str, *, aliases: tuple[str, ...] = ()) -> Any:
    """A repeatable `--flag NAME=PATH` field (a bare PATH is named by its folder), collected into a dict."""
    return option(None, help, aliases=aliases, action="append", item=named_path, convert=dict, metavar="NAME=PATH")


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (its factory called), or MISSING."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def escape(text: str) -> str:
    """Help text with `%` doubled: argparse expands %-formats in help and crashes on a lone `%`."""
    return text.replace("%", "%%")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _item_type(t: str) -> Callable | None:
    """The argparse `type` of one value of a field whose annotation is `t` (a string under postponed
    annotations)."""
    if "dict" in t or "tuple" in t or "list" in t:
        return yaml.safe_load
    if "int" in t and "float" not in t:
        return int
    if "float" in t:
        return float
    return None


def key_value(item: str) -> tuple[str, Any]:
    """A `KEY=VALUE` flag value as (key, value); the value is read as a YAML scalar or list (3, 0.5, true,
    [1, 2]) and dashes in the key become underscores. Repeated flags become a dict (`convert=dict`)."""
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    return k.strip().replace("-", "_"), yaml.safe_load(v)


def named_path(item: str) -> tuple[str, str]:
    """A `NAME=PATH` flag value as (name, path); a bare PATH is named by its last folder."""
    import os

    name, sep, path = item.partition("=")
    if not sep:
        name, path = os.path.basename(os.path.normpath(item)), item
    return name, path


def comma_list(text: str) -> tuple[str, ...]:
    """A comma-separated flag value ("zeroshot,sync") as a tuple."""
    return tuple(text.split(","))


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls,
    helps: dict | None = None,
    skip=(),
    only=None,
    defaults: dict | None = None,
    with_defaults: bool = False,
):
    """One argument per field of dataclass `cls` (flag name = field name), typed by the field; the default
    stays in the dataclass (flags default to None = not given; positionals are required). Help comes from
    the field's metadata (or `helps`, by field name) and shows the default in [brackets].

    `defaults`: a command's own defaults for some fields (the flag defaults to it); `with_defaults`: every
    flag defaults to its field's default (for handlers that read the namespace directly)."""
    helps, defaults = helps or {}, defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        meta = f.metadata
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        default = defaults.get(f.name, field_default(f))
        given_default = default if (f.name in defaults or with_defaults) and default is not _MISSING else None
        text = meta.get("help") or helps.get(f.name, "")
        kw: dict = {}
        for key in ("nargs", "metavar", "choices"):
            if key in meta:
                kw[key] = meta[key]
        if meta.get("positional"):
            if default is not _MISSING:
                kw.setdefault("nargs", "?")
                kw["default"] = default
            typ = meta.get("item") or _item_type(t)
            if typ is not None:
                kw["type"] = typ
            parser.add_argument(f.name, help=escape(text), **kw)
            continue
        if meta.get("item") is comma_list and isinstance(default, (tuple, list)):
            shown = f" [{','.join(default)}]"
        else:
            shown = "" if default is _MISSING or default is None else f" [{default}]"
        kw.update(dest=f.name, default=given_default, help=escape(text + shown))
        if meta.get("action") == "append":
            kw["action"] = "append"
            if meta.get("item"):
                kw["type"] = meta["item"]
        elif "bool" in t and "|" not in t:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            typ = meta.get("item") or (None if "nargs" in kw and "list" in t else _item_type(t))
            if "nargs" in kw and typ is yaml.safe_load:
                typ = None
            if typ is not None:
                kw["type"] = typ
        names = [meta["short"], flag_name(f.name)] if meta.get("short") else [flag_name(f.name)]
        if f.default is _MISSING and f.default_factory is _MISSING and not meta.get("aliases"):
            kw["required"] = True  # with aliases, config_from_flags checks it (any spelling counts)
        parser.add_argument(*names, **kw)
        for alias in meta.get("aliases", ()):
            hidden = {k: v for k, v in kw.items() if k not in ("help", "required")}
            if "BooleanOptionalAction" in str(hidden.get("action")):
                hidden["action"] = "store_const"
                hidden["const"] = True
            parser.add_argument(alias, **hidden, help=argparse.SUPPRESS)


def given(ns: argparse.Namespace, cls, skip=()) -> dict:
    """The fields of `cls` that were given on the command line (converted by their `convert` metadata); a
    list flag given with no values counts as not given."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is None or v == [] or f.name in skip:
            continue
        convert = f.metadata.get("convert")
        out[f.name] = convert(v) if convert else v
    return out


def config_from_flags(ns: argparse.Namespace, cls, **extra):
    """The config dataclass with every flag that was given (and `extra` fields set by the caller)."""
    kw = {**given(ns, cls), **extra}
    missing = [flag_name(f.name) for f in dataclasses.fields(cls) if f.name not in kw and field_default(f) is _MISSING]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)}")
    return cls(**kw)


def config_kwargs(cfg) -> dict:
    """A config's fields as keyword arguments (shallow: nested values are passed as they are)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def call_with(fn: Callable, cfg, *args, **extra):
    """`fn(*args, **fields of cfg, **extra)`: how a command calls its function with its config."""
    return fn(*args, **config_kwargs(cfg), **extra)


def signature_mismatches(fn: Callable, cls) -> list[str]:
    """Fields of `cls` that are not parameters of `fn`, or whose default differs from fn's signature
    default (the test that keeps `fn`'s defaults reading the config's)."""
    import inspect

    params = inspect.signature(fn).parameters
    bad = []
    for f in dataclasses.fields(cls):
        p = params.get(f.name)
        if p is None:
            if not any(q.kind is q.VAR_KEYWORD for q in params.values()):
                bad.append(f"{f.name}: not a parameter of {fn.__name__}")
            continue
        d = field_default(f)
        if d is _MISSING or p.default is inspect.Parameter.empty:  # required: the CLI may still default it
            continue
        if p.default != d:
            bad.append(f"{f.name}: {fn.__name__} default {p.default!r} != config default {d!r}")
    return bad


__all__ = [
    "option",
    "field_default",
    "escape",
    "comma_list",
    "key_value",
    "named_path",
    "add_config_flags",
    "given",
    "config_from_flags",
    "config_kwargs",
    "call_with",
    "signature_mismatches",
]
