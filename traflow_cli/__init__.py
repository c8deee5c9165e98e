"""traflow: distill a pre-trained rectified flow into a 1-4 step student with TraFlow.

Notebook API (CPU by default)::

    from traflow_cli import load_teacher, load_student
    teacher = load_teacher("runs/toy2d/teacher")   # teacher.velocity(x, t), teacher.sample(noise)
    student = load_student("runs/toy2d/student")   # student.jump(x, t, s)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from traflow_cli.version import __version__

if TYPE_CHECKING:
    from traflow_cli.api import load_student, load_teacher


def __getattr__(name: str) -> Any:
    # Lazy, so `traflow --help` and spec errors never pay for importing torch.
    if name in ("load_teacher", "load_student"):
        from traflow_cli import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["load_student", "load_teacher", "__version__"]
