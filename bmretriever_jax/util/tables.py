"""One table renderer for everything `bmr` prints or writes as a table (eval, sweep, merge search, the
markdown tables of README.md and docs/): the first column left-aligned, numbers right-aligned, floats to `digits` places."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence


def _cell(v: Any, digits: int) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render(header: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 4, markdown: bool = False) -> str:
    """rows: one sequence of cells per row, in header order (None = empty)."""
    cells = [[_cell(v, digits) for v in row] for row in rows]
    if markdown:
        lines = ["|" + "|".join(f" {h} " if h else " " for h in header) + "|", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(list(map(str, header))), "-" * (sum(widths) + 2 * (len(widths) - 1))]
                     + [line(r) for r in cells])


def from_records(records: Mapping[str, Mapping[str, Any]], columns: Optional[Sequence[str]] = None, *,
                 first: str = "", digits: int = 4, markdown: bool = False) -> str:
    """{row name: {column: value}} -> a table; columns default to every key in first-seen order."""
    if columns is None:
        columns = []
        for row in records.values():
            columns += [c for c in row if c not in columns]
    return render([first, *columns], [[name, *(row.get(c) for c in columns)] for name, row in records.items()],
                  digits=digits, markdown=markdown)
