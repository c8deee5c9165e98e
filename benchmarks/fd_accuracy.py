"""How far the central difference in s (distill.derivative = "fd") is from forward mode.

    python benchmarks/fd_accuracy.py runs/shapes32/student [--steps 1e-3 3e-4 1e-4 3e-5]

On a distilled student, at chord points as L_vel sees them (x_r = r x_hat + (1 - r) noise with
x_hat the student's own one-jump sample, r <= s <= 1), in float32: the relative L2 error of
dG/ds by central difference at each step against torch.func.jvp, and L_vel under each. Too
large a step is biased by the s features' curvature (up to 999 rad per unit time), too small a
one by float32 rounding; docs/PERFORMANCE.md records the result that set the default.
"""

from __future__ import annotations

import argparse

import torch

from traflow_cli.flow import interpolate
from traflow_cli.jobs.common import sample_shape
from traflow_cli.models import load_student
from traflow_cli.objectives.shared import jump, jump_derivative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", help="a `traflow distill` run folder")
    parser.add_argument("--steps", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4, 3e-5])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    student = load_student(args.student)
    net, batch = student.net, args.batch
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((batch, *sample_shape(student.config)), generator=gen)
    classes = student.config.get("num_classes", 0)
    labels = torch.arange(batch) % classes if classes else None
    t_min = float(student.times(1)[0])  # 0 for a rectified flow; EDM grids start above it
    r = t_min + (1 - t_min) * torch.rand(batch, generator=gen)
    s = r + (1 - r) * torch.rand(batch, generator=gen)
    with torch.no_grad():
        x_hat = jump(net, (1 - t_min) * noise, torch.full((batch,), t_min), torch.ones(batch),
                     labels)
    x_r = interpolate(noise, x_hat, r)
    chord = x_hat - noise
    exact = jump_derivative(net, x_r, r, s, labels, method="jvp").detach()
    print(f"forward mode: L_vel {((exact - chord) ** 2).mean().item():.5f}")
    for step in args.steps:
        with torch.no_grad():
            approx = jump_derivative(net, x_r, r, s, labels, method="fd", fd_step=step)
        error = ((approx - exact).norm() / exact.norm()).item()
        print(f"fd_step {step:g}: relative error {error:.2e}, "
              f"L_vel {((approx - chord) ** 2).mean().item():.5f}")


if __name__ == "__main__":
    main()
