"""Griffe extension: render the Sphinx markup of gpsparse's docstrings as mkdocstrings Markdown.

The docstrings are NumPy style and are also read with ``help()``, so they use
Sphinx cross-reference roles (``:func:`lanczos```, ``:class:`~gpsparse.SparseLinearOperator```)
and a few ``.. math::`` directives. Before mkdocstrings parses a docstring this
extension rewrites

* a role whose target resolves (in the scope of the documented object, as
  Sphinx would) to a public, documented gpsparse object on a rendered page into
  an autorefs cross-reference ``[`text`][full.path]`` — a broken link then fails
  the strict build;
* any other role (torch, the standard library, private helpers, modules
  without a page) into plain code, ``text``;
* ``.. math::`` (block or one-line) into a ``$$ … $$`` block for MathJax, and
  ``:math:`x``` into ``$x$``;
* the reStructuredText literal-block marker (a paragraph ending in ``::``
  before an indented block) into a single colon, as Sphinx shows it;
* a line holding nothing but a role (an item of a NumPy ``Functions`` or
  ``Classes`` section) into the bare name, which mkdocstrings links itself;
* reStructuredText simple tables (``===  ===`` borders) into Markdown tables;
* a reStructuredText definition list at the top level of a docstring and
  outside the NumPy sections (a short line after a blank line, followed by an
  indented description, as in a package docstring's list of exports) into a
  Markdown definition list;
* the two-space continuation indent of reStructuredText bullet items into the
  four spaces Python-Markdown needs, so that paragraphs and literal blocks
  inside an item stay inside it.

Options (``mkdocs.yml``): ``pages`` — the modules and packages that have an API
page; an object is linkable when its canonical module is one of them, or when a
package among them exports it in ``__all__`` (then the link goes to that
package's alias, e.g. ``gpsparse.kernels.WendlandKernel``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r"(?<![\w`]):(?:py:)?(func|class|mod|meth|attr|data|exc|obj|const|math):`([^`]+)`")
LONE_ROLE = re.compile(r"^[ \t]*:(?:py:)?(func|class|mod|meth|attr|data|exc|obj|const):`([^`]+)`[ \t]*$", re.M)
LIST_MARKER = re.compile(r"^( *)([*+-]|\d+[.)]) +(?=\S)")
DEFINITION_TERM = re.compile(r"^(?![*+-] |\d+[.)] |>>>|\.\.|\$\$)\S.{0,78}(?<![:,;])$")
TABLE_BORDER = re.compile(r"^( *)=+(?: +=+)+ *$")
UNDERLINE = re.compile(r"^ *-{3,} *$")
NUMPY_SECTIONS = {
    "parameters",
    "other parameters",
    "returns",
    "yields",
    "receives",
    "raises",
    "warns",
    "warnings",
    "attributes",
    "methods",
    "functions",
    "classes",
    "modules",
    "examples",
    "type aliases",
}
MATH_LINE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>\S.*)?$")
LINKING_ROLES = {"func", "class", "mod", "meth", "attr", "data", "exc", "obj", "const"}


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles and math directives in every docstring of a loaded package."""

    def __init__(self, pages: list[str] | None = None) -> None:
        super().__init__()
        self.pages = set(pages or [])

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                text = _convert_math(obj.docstring.value)
                text = _convert_simple_tables(_convert_literal_markers(text))
                text = _widen_list_items(_convert_definitions(text))
                text = LONE_ROLE.sub(lambda m: _split_title(m.group(2))[0], text)
                obj.docstring.value = ROLE.sub(lambda m, o=obj: self._role(o, m.group(1), m.group(2)), text)

    def _role(self, obj: griffe.Object, role: str, content: str) -> str:
        if role == "math":
            return f"${content}$"
        title, target = _split_title(content)
        if role in LINKING_ROLES:
            identifier = self._identifier(obj, target, role)
            if identifier is not None:
                return f"[`{title}`][{identifier}]"
        return f"`{title}`"

    def _identifier(self, obj: griffe.Object, target: str, role: str) -> str | None:
        """The autorefs identifier of ``target`` seen from ``obj``, or None when it has no page."""
        found = _lookup(obj, target)
        if found is None:
            return None
        if found.is_module and role != "mod":  # a function exported over its own module's name (gpsparse.solve)
            name = target.rsplit(".", 1)[-1]
            member = found.members.get(name)
            if member is None:
                return None
            found = _final(member)
            if found is None:
                return None
        return self._page_path(found)

    def _page_path(self, found: griffe.Object) -> str | None:
        path = found.path
        if any(part.startswith("_") for part in path.split(".")):
            return None
        if found.is_module:
            return path if path in self.pages else None
        if found.docstring is None or not found.docstring.value.strip():
            return None
        module = found.module.path
        if module in self.pages:
            return path
        for page in self.pages:  # exported by a documented package under another name
            try:
                package = found.modules_collection.get_member(page)
            except (KeyError, ValueError):
                continue
            for name, member in package.members.items():
                if member.is_alias and member.is_exported and _final(member) is found:
                    return f"{page}.{name}"
        return None


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _final(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _split_title(content: str) -> tuple[str, str]:
    """``title <target>`` → (title, target); ``~a.b.c`` → (c, a.b.c); ``a.b`` → (a.b, a.b)."""
    explicit = re.fullmatch(r"(.*?)\s*<([^>]+)>", content)
    if explicit:
        return explicit.group(1), explicit.group(2).lstrip("~!")
    target = content.lstrip("!")
    if target.startswith("~"):
        target = target[1:]
        return target.rsplit(".", 1)[-1], target
    return target, target


def _lookup(obj: griffe.Object, target: str) -> griffe.Object | None:
    """Resolve a (possibly dotted, possibly relative) name as Sphinx does: local scopes first, then absolute."""
    collection = obj.modules_collection
    head, _, rest = target.partition(".")
    candidates = []
    try:
        resolved = obj.resolve(head)
        candidates.append(f"{resolved}.{rest}" if rest else resolved)
    except griffe.NameResolutionError:
        pass
    candidates.append(target)
    for path in candidates:
        try:
            found = collection.get_member(path)
        except (KeyError, ValueError, griffe.AliasResolutionError):
            continue
        final = _final(found)
        if final is not None:
            return final
    return None


def _convert_math(text: str) -> str:
    """``.. math::`` directives (one-line or indented block) → ``$$`` blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = MATH_LINE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        body = [match.group("inline")] if match.group("inline") else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if lines[i].strip() or body:
                body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += [f"{indent}$$", *(f"{indent}{line}" for line in body), f"{indent}$$", ""]
    return "\n".join(out)


def _convert_literal_markers(text: str) -> str:
    """``text::`` before an indented block → ``text:`` (``::`` alone on its line → removed)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        stripped = line.rstrip()
        if not stripped.endswith("::") or stripped.lstrip().startswith(".."):
            continue
        following = next((other for other in lines[i + 1 :] if other.strip()), None)
        indent = len(line) - len(line.lstrip())
        if following is None or len(following) - len(following.lstrip()) <= indent:
            continue
        if stripped.strip() == "::":
            lines[i] = ""
        elif stripped.endswith(" ::"):
            lines[i] = stripped[:-3]
        else:
            lines[i] = stripped[:-1]
    return "\n".join(lines)


def _widen_list_items(text: str) -> str:
    """Indent the lines belonging to a list item to the item marker + 4 columns (Python-Markdown's rule)."""
    out = []
    stack: list[tuple[int, int]] = []  # (marker indent, extra indent of the item's lines), original columns
    for line in text.split("\n"):
        if not line.strip():
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip(" "))
        while stack and indent <= stack[-1][0]:
            stack.pop()
        shift = sum(extra for _, extra in stack)
        out.append(" " * shift + line)
        marker = LIST_MARKER.match(line)
        if marker:
            stack.append((indent, max(0, 4 - (len(marker.group(0)) - indent))))
    return "\n".join(out)


def _convert_definitions(text: str) -> str:
    """``term`` + more-indented description → Markdown ``term`` / ``:   description`` (outside NumPy sections)."""
    lines = text.split("\n")
    out: list[str] = []
    in_numpy_section = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and line.strip() and UNDERLINE.match(lines[i + 1]):
            in_numpy_section = line.strip().lower() in NUMPY_SECTIONS
        following = lines[i + 1] if i + 1 < len(lines) else ""
        previous = lines[i - 1] if i > 0 else ""
        out.append(line)
        i += 1
        if in_numpy_section or not DEFINITION_TERM.match(line) or previous.strip() or not following.startswith(" "):
            continue
        base = len(following) - len(following.lstrip())
        first = True
        while i < len(lines) and lines[i].strip() and lines[i].startswith(" "):
            out.append((":   " if first else "    ") + lines[i][min(base, len(lines[i]) - len(lines[i].lstrip())) :])
            first = False
            i += 1
        out.append("")
    return "\n".join(out)


def _convert_simple_tables(text: str) -> str:
    """reStructuredText simple tables → Markdown tables (columns from the ``=`` runs of the top border)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        border = TABLE_BORDER.match(lines[i])
        borders = [i]
        end = i + 1
        while border and end < len(lines) and lines[end].strip():
            if TABLE_BORDER.match(lines[end]):
                borders.append(end)
            end += 1
        if len(borders) < 2:
            out.append(lines[i])
            i += 1
            continue
        starts = [match.start() for match in re.finditer(r"=+", lines[i])]
        rows: list[list[str]] = []
        for number in range(i + 1, borders[-1]):
            if number in borders:
                continue
            line = lines[number]
            cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], len(line)])]
            if rows and not cells[0] and number - 1 not in borders:  # a continuation line of the previous row
                rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
            else:
                rows.append(cells)
        indent = border.group(1)
        table = [indent + "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in rows]
        if out and out[-1].strip():
            out.append("")
        out += [table[0], indent + "|" + "---|" * len(starts), *table[1:], ""]  # first row = header
        i = borders[-1] + 1
    return "\n".join(out)
