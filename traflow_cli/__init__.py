"""traflow: distill a pre-trained rectified flow into a 1-4 step student with TraFlow.

Notebook API (CPU by default)::

    from traflow_cli import load_teacher, load_student
    teacher = load_teacher("runs/toy2d/teacher")   # teacher.velocity(x, t), teacher.sample(noise)
    student = load_student("runs/toy2d/student")   # student.jump(x, t, s), student.sample(noise)

The names come from `traflow_cli.models` (the jobs load models there too), imported on first use
so that `traflow --help` and spec errors never pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from traflow_cli.version import __version__

if TYPE_CHECKING:
    from traflow_cli.models import Student, Teacher, load_student, load_teacher

__all__ = ["Student", "Teacher", "__version__", "load_student", "load_teacher"]


def __getattr__(name: str) -> Any:
    if name in __all__:  # __version__ is bound above: only the models' names get here
        from traflow_cli import models

        return getattr(models, name)
    raise AttributeError(f"module 'traflow_cli' has no attribute {name!r}")

