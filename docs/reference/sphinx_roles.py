"""Griffe extension for the docs build: Sphinx markup in the docstrings rendered as Markdown.

The docstrings are Google style with a few reStructuredText habits: roles such as :class:`~pkg.mod.Name` and
:func:`name`, and ``Usage::`` before an indented literal block. mkdocstrings renders Markdown, where a role
would show as ``:class:`` followed by code. This extension rewrites, before griffe parses a docstring:

* ``:role:`~a.b.Name``` -> ```Name``` (the ``~`` form shows the last component, as Sphinx does);
  ``:role:`a.b.Name``` -> ```a.b.Name```; ``:role:`text <target>``` -> ```text```;
* a line ending in ``::`` (a literal block follows) -> the same line ending in ``:``; the indented block
  after it is a Markdown code block already.

Only the documentation changes; the source files are not touched. Loaded from ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?[a-z]+:`(?P<body>[^`]+)`")
_LITERAL = re.compile(r"(?m)(\S)::[ \t]*$")


def _role(match: re.Match[str]) -> str:
    body = match.group("body").strip()
    titled = re.fullmatch(r"(?P<title>.+?)\s*<[^>]+>", body)
    if titled:
        body = titled.group("title")
    elif body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]
    return f"`{body}`"


def markdown_docstring(text: str) -> str:
    """The docstring ``text`` with Sphinx roles as code spans and ``::`` literal markers as ``:``."""
    return _LITERAL.sub(r"\1:", _ROLE.sub(_role, text))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring griffe loads (modules, classes, functions, attributes)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
