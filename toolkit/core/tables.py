"""One table renderer for every stage's report: aligned text, GitHub Markdown or CSV (standard library only)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

FORMATS = ("text", "markdown", "csv")


def render(head: Sequence[str], body: Sequence[Sequence[str]], fmt: str = "text") -> str:
    """`head` and every row of `body` as one table; cells are already strings."""
    if fmt == "markdown":
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(row) + " |" for row in body])
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(head)
        writer.writerows(body)
        return buf.getvalue().rstrip("\n")
    if fmt != "text":
        raise ValueError(f"table format must be one of {FORMATS}, got {fmt!r}")
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *body])
