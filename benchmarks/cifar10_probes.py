"""Cheap probes of the CIFAR-10 student's gap to its teacher (issue 19's "measure before changing").

Each probe answers one question, on the same 2,000 noises (sample i from the noise of (seed, i),
as `traflow sample` draws it), with FID against the study's reference images:
  - rk45, heun12: the teacher's RK45 solve and the 12-step Heun solve the targets are built from
    (the ceiling of a target made of 12 Heun steps);
  - student-nfe1, student-nfe2: the student;
  - rk45-blur: RK45's samples blurred until their PSNR against RK45 is the 1-jump student's:
    is the gap blur?
  - memorisation: the 1-jump student's PSNR against the teacher's Heun-12 end on the noises of its
    trajectory cache, and on as many fresh noises: is it memorising?
Every stage is skipped when its output is there (re-run to continue). Writes probes.json.

Usage: python benchmarks/cifar10_probes.py --teacher T --student S [--cache CACHE.safetensors]
       [--data ZIP] [--study-dir DIR] [--samples 2000] [--reference 5000] [--fid-samples N]
  --fid-samples N: FID on the first N samples of each row (against --reference images); on one
     CPU thread Inception takes ~0.3 s an image, so N = 1,000 and 1,000 reference images keep
     five rows under half an hour. Small N biases FID upwards alike for every row: compare rows,
     not against published numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cifar10_cpu_study import Study, psnr_folders, resolve_data  # noqa: E402

from traflow_cli import load_student, load_teacher  # noqa: E402
from traflow_cli.flow import solve_on_grid  # noqa: E402
from traflow_cli.grids import teacher_grid  # noqa: E402
from traflow_cli.metrics.agreement import mse_psnr  # noqa: E402


def first_images(folder: Path, out: Path, count: int) -> Path:
    """out/images holding hard links to the first `count` PNGs of folder/images."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    for path in sorted((folder / "images").glob("*.png"))[:count]:
        link = out / "images" / path.name
        if not link.exists():
            link.hardlink_to(path)
    return out


def blur_to_psnr(source: Path, out: Path, target_db: float) -> dict:
    """Gaussian-blur every PNG of source/images into out/images, with the one radius (found by
    bisection) at which the blurred set's PSNR against the source is target_db."""
    names = sorted(p.name for p in (source / "images").glob("*.png"))
    images = [Image.open(source / "images" / n).convert("RGB") for n in names]
    original = np.stack([np.asarray(i, dtype=np.float64) for i in images])

    def blurred(radius: float) -> list[Image.Image]:
        return [i.filter(ImageFilter.GaussianBlur(radius)) for i in images]

    def psnr(radius: float) -> float:
        mse = ((np.stack([np.asarray(i, dtype=np.float64) for i in blurred(radius)])
                - original) ** 2).mean()
        return float(10 * np.log10(255.0**2 / mse))

    low, high = 0.05, 3.0  # PSNR falls as the radius grows
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if psnr(mid) > target_db else (low, mid)
    radius = (low + high) / 2
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, blurred(radius), strict=True):
        image.save(out / "images" / name)
    return {"radius_px": round(radius, 4), "psnr_db": round(psnr(radius), 3)}


@torch.no_grad()
def memorisation(teacher_dir: Path, student_dir: Path, cache: Path, count: int) -> dict:
    """The 1-jump student against the teacher's Heun end x_hat on `count` of its cached noises and
    on `count` fresh ones (solved here on the same grid)."""
    from safetensors.torch import load_file

    saved = load_file(cache)
    teacher, student = load_teacher(teacher_dir), load_student(student_dir)
    steps = len(saved["trajectory"]) - 1
    grid = teacher_grid("uniform", steps, None)
    fresh = torch.randn(saved["noise"][:count].shape, generator=torch.Generator().manual_seed(12345))

    def one_jump(noise: torch.Tensor) -> torch.Tensor:
        zeros, ones = torch.zeros(len(noise)), torch.ones(len(noise))
        return torch.cat([student.jump(c, zeros[:len(c)], ones[:len(c)]) for c in noise.split(250)])

    cached_psnr = mse_psnr(one_jump(saved["noise"][:count]), saved["trajectory"][-1][:count])[1]
    fresh_end = torch.cat([solve_on_grid(teacher.net, c, grid, method="heun")
                           for c in fresh.split(250)])
    fresh_psnr = mse_psnr(one_jump(fresh), fresh_end)[1]
    return {"noises": count, "grid_steps": steps, "cached_psnr_db": round(cached_psnr, 3),
            "fresh_psnr_db": round(fresh_psnr, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None,
                        help="the student's teacher_trajectories.safetensors (memorisation probe)")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--study-dir", type=Path, default=Path("runs/cifar10-probes"))
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--reference", type=int, default=5000)
    parser.add_argument("--fid-samples", type=int, default=None)
    args = parser.parse_args()
    study = Study(root=args.study_dir, data=resolve_data(args.data), samples=args.samples,
                  reference=args.reference, teacher=args.teacher.resolve())
    path = study.root / "probes.json"
    out = json.loads(path.read_text()) if path.is_file() else {}

    def save() -> None:
        path.write_text(json.dumps(out, indent=1) + "\n")

    student = args.student.resolve()
    rk45 = study.sample("teacher-rk45", "teacher", "--solver", "rk45")
    rows = {"student-nfe1": study.sample("student-nfe1", str(student), "--nfe", 1),
            "student-nfe2": study.sample("student-nfe2", str(student), "--nfe", 2)}
    for name, folder in rows.items():
        out.setdefault("psnr_vs_rk45_db", {})[name] = round(psnr_folders(folder, rk45), 3)
    if args.cache and "memorisation" not in out:
        out["memorisation"] = memorisation(args.teacher, student, args.cache, 1000)
    save()
    blur = study.root / "samples" / "teacher-rk45-blur"
    if "blur" not in out:
        out["blur"] = blur_to_psnr(rk45, blur, out["psnr_vs_rk45_db"]["student-nfe1"])
        save()
    heun = study.sample("teacher-heun12", "teacher", "--solver", "heun", "--steps", 12)
    out["psnr_vs_rk45_db"]["teacher-heun12"] = round(psnr_folders(heun, rk45), 3)
    save()
    count = args.fid_samples or args.samples
    scorer = Study(root=study.root / f"fid-{count}-ref{args.reference}", data=study.data,
                   reference=args.reference, teacher=study.teacher)
    reference = scorer.export_reference()
    out["fid_protocol"] = {"samples": count, "reference_images": args.reference}
    for name, folder in [("teacher-rk45", rk45), ("student-nfe1", rows["student-nfe1"]),
                         ("teacher-rk45-blur", blur), ("teacher-heun12", heun),
                         ("student-nfe2", rows["student-nfe2"])]:
        subset = first_images(folder, scorer.root / "samples" / name, count)
        out.setdefault("fid", {})[name] = round(scorer.fid(name, subset, reference)["fid"], 3)
        save()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
