"""The rich tables the commands print."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Column, Table


def folded_table(*headers: RenderableType, title: str | None = None) -> Table:
    """A table whose values are folded, never cut with an ellipsis: one that does not fit its column (at a pipe's or
    a narrow terminal's 80 columns, a long id, URL or topic) wraps onto the next lines whole, so it can be read and
    told apart from another that starts alike."""
    return Table(*(Column(header, overflow="fold") for header in headers), title=title)
