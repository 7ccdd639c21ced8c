"""The one Markdown table writer: evaluation reports, experiment tables, DecoyMNIST and benchmark summaries."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A pipe table without a trailing newline; cells are str()'d. `right`: indices of right-aligned columns."""
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"
    return "\n".join([_row(header), rule] + [_row(r) for r in rows])


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
