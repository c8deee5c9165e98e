"""Typer only: one module per subcommand; jobs are imported inside commands."""
