"""Command-line flags built from configuration dataclasses: one definition (name, type, default, help) per option.

A field ``batch_size: int = 128`` documented as ``batch_size: mini-batch size.`` under ``Attributes:`` in its
class docstring becomes ``--batch-size N`` (type int, default 128, that help text). Per-field ``metadata``
refines it:

* ``"flag"``: the flag's name instead of ``--field-name`` (e.g. ``"--out"`` for ``out_dir``);
* ``"aliases"``: more names for the same flag (e.g. ``("--algorithm",)`` for ``solver``);
* ``"choices"``: the allowed values; ``"metavar"``; ``"positive"``: a finite number > 0;
* ``"cli": False``: not a flag.

Types: ``int``, ``float``, ``str``, ``bool`` (``--x`` / ``--no-x``), ``tuple[int, ...]`` (comma-separated),
``X | None`` (default None), and a nested frozen dataclass (each of its fields becomes a flag; e.g.
``LossWeights`` gives ``--regression``, ``--residual``, ``--distance``). :func:`config_from_args` builds the
dataclass back from the parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text under ``Attributes:`` in ``cls``'s Google-style docstring.

    An entry ``"a, b: text"`` documents both ``a`` and ``b``; continuation lines (indented deeper) are joined.
    """
    doc = cls.__doc__ or ""
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    indent = None
    names: list[str] = []
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        match = re.match(r"^([A-Za-z_][\w, ]*):\s*(.*)$", line.strip()) if depth == indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for n in names:
                out[n] = match.group(2).strip()
        else:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return {name: text.replace("``", "") for name, text in out.items()}


def _comma_ints(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not out or any(v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected nonnegative ints, got {text!r}")
    return out


def _comma_positive_ints(text: str) -> tuple[int, ...]:
    out = _comma_ints(text)
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return out


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive (and finite), got {text}")
    return value


def _optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _flag(f: dataclasses.Field, prefix: str = "") -> str:
    return f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")


def _fields(cls: type, only: Iterable[str] | None, exclude: Iterable[str]) -> list[dataclasses.Field]:
    names = [f.name for f in dataclasses.fields(cls)]
    if only is not None:
        only = list(only)
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}")
    skip = set(exclude)
    return [f for f in dataclasses.fields(cls)
            if (only is None or f.name in only) and f.name not in skip and f.metadata.get("cli", True)]


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                            only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                            defaults: Mapping[str, Any] | None = None, suppress_defaults: bool = False,
                            parent_help: str = "") -> None:
    """Add one flag per field of the dataclass ``cls`` (see the module docstring).

    Args:
        parser: the parser or argument group.
        cls: a dataclass (its fields' types, defaults, docstring and metadata define the flags).
        only: the fields to add (default: all); exclude: fields to leave out.
        defaults: field -> default shown and used instead of the dataclass's (e.g. a benchmark's own scale).
        suppress_defaults: leave unset flags out of the namespace (``argparse.SUPPRESS``), so that a caller can
            tell given flags from defaults (e.g. ``evaluate`` overriding a saved configuration).
        parent_help: for the fields of a nested dataclass: the parent field's help, used where a field has none.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = dict(defaults or {})
    instance_defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                         for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
                         or f.default_factory is not dataclasses.MISSING}
    for f in _fields(cls, only, exclude):
        tp, _ = _optional(hints[f.name])
        default = defaults.get(f.name, instance_defaults.get(f.name))
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, defaults=dataclasses.asdict(default) if default is not None else None,
                                    suppress_defaults=suppress_defaults, parent_help=docs.get(f.name, ""))
            continue
        names = [_flag(f), *f.metadata.get("aliases", ())]
        text = docs.get(f.name) or (f"{parent_help.rstrip('.')}: {f.name}" if parent_help else "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": text.replace("%", "%%") or None}
        if "choices" in f.metadata:
            kwargs["choices"] = tuple(f.metadata["choices"])
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kwargs["type"] = _comma_positive_ints if f.metadata.get("positive") else _comma_ints
            kwargs.setdefault("metavar", "N,N,...")
        elif tp is float and f.metadata.get("positive"):
            kwargs["type"] = positive_float
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {tp!r}")
        kwargs["default"] = argparse.SUPPRESS if suppress_defaults else default
        if not suppress_defaults and tp is not bool:
            shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) \
                else str(default)
            kwargs["help"] = f"{kwargs['help'] or ''} (default: {shown.replace('%', '%%')})".lstrip()
        parser.add_argument(*names, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace | Mapping[str, Any], **overrides: Any) -> Any:
    """Build the dataclass ``cls`` from parsed arguments (fields not given keep their defaults).

    Nested dataclass fields are rebuilt from their own fields' values. ``overrides`` win over ``args``.
    """
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, _ = _optional(hints[f.name])
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(tp):
            sub = {g.name: values[g.name] for g in dataclasses.fields(tp) if g.name in values}
            if sub:
                kwargs[f.name] = config_from_args(tp, sub)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)
