"""Agreement of a student with its teacher's RK45 solve, one jump and two jumps over middle times.

For each noise z (sample i from the noise of (seed, i), as `traflow sample` draws it) it compares
with the teacher's RK45 solve Phi(z, 0 -> 1):
  - one jump G(z, 0, 1), 4 jumps at 0, 1/4, 1/2, 3/4, and 2 jumps G(G(z, 0, m), m, 1) for every
    middle time m;
  - where the 2-jump error comes from: the first jump G(z, 0, m) against the teacher's state
    Phi(z, 0 -> m) (PSNR), and the second jump G(Phi(z, 0 -> m), m, 1) started from the teacher's
    own state (PSNR against RK45).
Prints one JSON object; with --out, also writes it there. The RK45 solves are cached in --cache.

Usage: python benchmarks/middle_times.py TEACHER STUDENT [-n 500] [--middle 0.25,0.3,...]
       [--cache FILE.pt] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traflow_cli import load_student, load_teacher  # noqa: E402
from traflow_cli.flow import solve_rk45_per_sample  # noqa: E402
from traflow_cli.grids import student_times  # noqa: E402
from traflow_cli.jobs.common import sample_shape  # noqa: E402
from traflow_cli.metrics.agreement import mse_psnr  # noqa: E402
from traflow_cli.sampling import noise_for_indices, teacher_row_velocity  # noqa: E402


def write_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """Images [N, C, H, W] in [-1, 1] as one PNG, `columns` a row, each shown at 2x."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = pixels.shape
    rows = (n + columns - 1) // columns
    canvas = torch.zeros(c, rows * h, columns * w, dtype=torch.uint8)
    for i, image in enumerate(pixels):
        r, col = divmod(i, columns)
        canvas[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST).save(path)

DEFAULT_MIDDLE = "0.25,0.3,0.4,0.4167,0.45,0.5,0.55,0.6,0.75"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("student", type=Path)
    parser.add_argument("-n", "--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--middle", default=DEFAULT_MIDDLE)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=None,
                        help="file for the teacher's RK45 ends and middle states (reused)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None,
                        help="PNG of the first 10 noises: rows RK45, 1 jump, 2 jumps (middle 0.5)")
    args = parser.parse_args()
    middles = sorted({float(m) for m in args.middle.split(",")} - {0.0, 1.0})

    teacher, student = load_teacher(args.teacher), load_student(args.student)
    noise = noise_for_indices(range(args.num_samples), sample_shape(student.config), args.seed)
    key = {"n": args.num_samples, "seed": args.seed, "middle": middles,
           "teacher": teacher.sha256}
    saved = torch.load(args.cache, weights_only=True) if args.cache and args.cache.is_file() else {}
    if saved.get("key") != json.dumps(key):
        # One per-sample RK45 solve (rtol = atol = 1e-4, as the study's reference), stopping at
        # each middle time on its way to the data end.
        velocity = teacher_row_velocity(teacher.net)
        stops = sorted(set(middles)) + [1.0]
        states: dict[float, list[torch.Tensor]] = {m: [] for m in stops}
        for chunk in noise.split(args.batch):
            x, t = chunk, 0.0
            with torch.no_grad():
                for m in stops:
                    x = solve_rk45_per_sample(velocity, x, t0=t, t1=m, rtol=1e-4, atol=1e-4)[0]
                    states[m].append(x)
                    t = m
        saved = {"key": json.dumps(key), "end": torch.cat(states.pop(1.0)),
                 **{f"at_{m}": torch.cat(v) for m, v in states.items()}}
        if args.cache:
            torch.save(saved, args.cache)
    reference = saved["end"]

    def jumps(x: torch.Tensor, t: float, s: float) -> torch.Tensor:
        full = torch.full((len(x),), t), torch.full((len(x),), s)
        with torch.no_grad():
            return torch.cat([student.jump(c, full[0][:len(c)], full[1][:len(c)])
                              for c in x.split(args.batch)])

    one = jumps(noise, 0.0, 1.0)
    four, quarters = noise, student_times(4).tolist()
    for t, s in zip(quarters[:-1], quarters[1:], strict=True):
        four = jumps(four, t, s)
    result = {"student": str(args.student), "n": args.num_samples,
              "nfe1_psnr": round(mse_psnr(one, reference)[1], 3),
              "nfe4_psnr": round(mse_psnr(four, reference)[1], 3), "middle": {}}
    for m in middles:
        first = jumps(noise, 0.0, m)
        teacher_m = saved[f"at_{m}"]
        result["middle"][str(m)] = {
            "nfe2_psnr": round(mse_psnr(jumps(first, m, 1.0), reference)[1], 3),
            "first_jump_psnr": round(mse_psnr(first, teacher_m)[1], 3),
            "second_from_teacher_psnr": round(mse_psnr(jumps(teacher_m, m, 1.0), reference)[1], 3),
        }
    if args.grid:
        rows = [reference[:10], one[:10], jumps(jumps(noise[:10], 0.0, 0.5), 0.5, 1.0)]
        write_grid(torch.cat(rows), args.grid, columns=10)
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
