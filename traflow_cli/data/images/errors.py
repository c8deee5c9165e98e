"""Dataset failures a user can fix, each one line naming the file (and its zip or folder)."""

from __future__ import annotations

from traflow_cli.errors import UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset that is not where we looked; its message is one line: where, and how to get it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DatasetError(UserError, ValueError):
    """A dataset that is there but unusable: an unreadable image, mixed sizes, bad labels."""
