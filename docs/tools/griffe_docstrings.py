"""A griffe extension that reads this project's docstrings as griffe's Google parser expects them.

Three conventions of the code base differ from what the parser and Markdown take:

- ``Example:`` (singular) heads a doctest; the parser knows only ``Examples:`` and would render
  the ``>>>`` lines as Markdown (block quotes) instead of code.
- An ``Args:`` line may document several parameters at once (``a, b, c: as in ...``); the parser
  would take ``a, b, c`` for one parameter that the signature lacks.
- Cross-references are Sphinx roles (``:class:`~lightning_hessian.engine.SpectralDensity```,
  ``:meth:`measure```), which Markdown would print as they are.

The extension rewrites the docstring text before it is parsed: the heading becomes ``Examples:``,
a grouped line becomes one line per parameter, each with the shared description, and a role becomes
a link to the object where the reference documents it (code text where it does not: the link is
optional, so a reference to an undocumented object is no error). Names are resolved as Python
would resolve them in the docstring's scope. The code is not touched; every other docstring check of
the parser stays on.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+):(.*)$")
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)(?:\(\))?`")


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` as seen from ``obj``'s scope, or ``None``."""
    if name.split(".")[0] == obj.package.name:
        return name
    head, _, rest = name.partition(".")
    try:
        base = obj.resolve(head)
    except Exception:  # griffe.NameResolutionError, or a scope it cannot walk
        return None
    return f"{base}.{rest}" if rest else base


def _link_roles(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name
        path = _resolve(obj, name)
        if path is None:
            return f"`{shown}`"
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

    return _ROLE.sub(link, text)


def _split_grouped(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _ARGS.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if section_indent is not None and line.strip() and indent <= section_indent:
            section_indent = None  # the section ended
        grouped = _GROUPED.match(line) if section_indent is not None else None
        if grouped is None:
            out.append(line)
            i += 1
            continue
        item_indent = len(grouped.group(1))
        continuation = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > item_indent):
            if not lines[i].strip():
                break
            continuation.append(lines[i])
            i += 1
        for name in (n.strip() for n in grouped.group(2).split(",")):
            out.append(f"{grouped.group(1)}{name}:{grouped.group(3)}")
            out.extend(continuation)
    return "\n".join(out)


class ProjectDocstrings(griffe.Extension):
    """Rewrite ``Example:`` headings, grouped ``Args:`` lines and Sphinx roles before the docstrings are parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        value = _EXAMPLE.sub(r"\1Examples:", docstring.value)
        docstring.value = _link_roles(obj, _split_grouped(value))
