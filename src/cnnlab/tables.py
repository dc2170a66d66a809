"""The one table formatter: rows of strings as aligned text columns or as a Markdown table."""

from __future__ import annotations


def format_table(head, body, left=(0,), rule: str = "-", markdown: bool = False) -> str:
    """``head`` and ``body`` rows (strings) as a table; columns whose index is in ``left`` align left,
    the others right. Text: columns two spaces apart, a line of ``rule`` under the head, no trailing
    spaces. Markdown: a pipe table with the same alignment."""
    rows = [list(map(str, head)), *(list(map(str, r)) for r in body)]
    if markdown:
        align = ["---" if i in left else "---:" for i in range(len(head))]
        return "\n".join(f"| {' | '.join(r)} |" for r in [rows[0], align, *rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, rule * max(len(line) for line in lines))
    return "\n".join(lines)
