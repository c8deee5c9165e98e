"""Notebook API: load a teacher or a student from a run folder, on the CPU by default.

    from traflow_cli.api import load_teacher, load_student
    teacher = load_teacher("runs/toy2d/teacher")   # teacher.velocity(x, t)
    student = load_student("runs/toy2d/student")   # student.jump(x, t, s), student.sample(noise)

The classes live in `traflow_cli.models`, which the jobs use too (jobs never import this module).
"""

from __future__ import annotations

from traflow_cli.models import Student, Teacher, load_student, load_teacher

__all__ = ["Student", "Teacher", "load_student", "load_teacher"]
