"""Tables that fit the terminal: the key column whole, the least important columns dropped first.

Every `slimctl` table (and the report `slimserve optimize` prints) is built as a `FitTable`: columns carry a rank
(0: the key, a model or variant name, never dropped and never cut; higher ranks go first when the table is wider
than the terminal) and say whether their text may wrap (names and numbers never do). `render(width)` drops columns,
highest rank first, until the narrowest layout fits `width`, and says in the caption which it left out;
`wide=True` (`-o wide`) keeps every column at its full width. `--json` prints the records themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import typer
from rich import box as boxes
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

OUTPUTS = ("table", "wide")


def _cells_width(cells: Sequence[str]) -> int:
    """The widest line of the cells, markup removed."""
    return max((Text.from_markup(line).cell_len for cell in cells for line in cell.split("\n")), default=0)


@dataclass(frozen=True)
class Col:
    header: str
    rank: int = 0  # 0: the key column, never dropped or cut; the highest rank is dropped first
    justify: str = "left"
    wraps: bool = False  # free text (a status message, a list) that may wrap; names and numbers never do
    style: str = ""


@dataclass
class FitTable:
    columns: list[Col]
    title: str | None = None
    caption: str | None = None
    box: Any = boxes.HEAVY_HEAD
    rows: list[Sequence[str]] = field(default_factory=list)

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(cells)

    def _table(self, keep: list[int], hidden: list[str]) -> Table:
        caption = self.caption or ""
        if hidden:
            note = f"[dim]not shown at this width: {', '.join(hidden)} (-o wide or --json show every column)[/dim]"
            caption = f"{caption}\n{note}" if caption else note
        table = Table(title=self.title, caption=caption or None, caption_justify="left", box=self.box)
        for i in keep:
            c = self.columns[i]
            table.add_column(
                c.header,
                justify=c.justify,  # type: ignore[arg-type]
                no_wrap=not c.wraps,
                overflow="fold" if c.wraps else "ellipsis",
                style=c.style,
                # A name or number is never cut: its column is as wide as its widest cell (rich would measure its longest word).
                min_width=None if c.wraps else max(_cells_width([c.header, *(row[i] for row in self.rows)]), 1),
            )
        for row in self.rows:
            table.add_row(*(row[i] for i in keep))
        return table

    def render(self, width: int, wide: bool = False) -> Table:
        """The table for a terminal `width` columns wide; with `wide`, every column."""
        keep = list(range(len(self.columns)))
        if wide:
            return self._table(keep, [])
        console = Console(width=width)
        hidden: list[int] = []
        while True:
            table = self._table(keep, [self.columns[i].header for i in sorted(hidden)])
            # Measured unconstrained: rich caps a column's measure at the width it was given.
            needed = Measurement.get(console, console.options.update_width(100_000), table).minimum
            droppable = [i for i in keep if self.columns[i].rank > 0]
            if needed <= width or not droppable:
                return table
            worst = max(droppable, key=lambda i: (self.columns[i].rank, i))  # the rightmost of the least important
            keep.remove(worst)
            hidden.append(worst)

    def print(self, console: Console, output: str = "table") -> None:
        """Prints at the console's width; `-o wide` at the full width of every column, whatever the terminal."""
        check_output(output)
        print_fitted(console, self.render(console.width, output == "wide"), output)


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise typer.BadParameter(f"'{output}' is not one of {', '.join(OUTPUTS)}", param_hint="-o/--output")


def print_fitted(console: Console, table: Table, output: str = "table") -> None:
    """A rendered table at the console's width, or with `-o wide` at its full width (lines longer than the terminal)."""
    check_output(output)
    if output == "wide":
        full = Measurement.get(console, console.options.update_width(100_000), table).maximum
        narrow = console.width
        console.width = max(narrow, full)  # print(width=) can only narrow the console
        try:
            console.print(table, crop=False)
        finally:
            console.width = narrow
    else:
        console.print(table)


def output_option() -> Any:
    """`-o table|wide` for every command that prints a table."""
    return typer.Option("table", "-o", "--output", help="table: fits the terminal, least important columns left out; wide: every column.")
