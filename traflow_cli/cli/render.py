"""Human-readable results: rich tables on stdout."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Print dict rows as a table, with the union of their keys as columns (in first-seen order)."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    out = Table(title=title)
    for name in columns:
        out.add_column(name, justify="left" if name in ("model", "solver", "task") else "right")
    for row in rows:
        out.add_row(*(_fmt(row.get(name)) for name in columns))
    console.print(out)


def training_summary(result: dict[str, Any]) -> None:
    final = result.get("final_metrics", {})
    rows = [{"field": k, "value": v} for k, v in final.items()]
    rows.append({"field": "checkpoint", "value": result.get("checkpoint")})
    table(f"{result['job']}: {result['steps']} steps, {result['wall_time_s']:.1f} s", rows)


def key_values(title: str, result: dict[str, Any]) -> None:
    table(title, [{"field": k, "value": v} for k, v in result.items()
                  if not isinstance(v, list | dict)])
