"""The CIFAR-10 CPU study: teacher, student, samples, FID and agreement, resumably.

Every stage is a `traflow` command (the same code a user runs) or a small measurement on the
files they wrote, and every stage is skipped when its output is complete, so re-running the
study after a kill continues where it stopped (train, distill and sample resume on their own).
What it writes, under STUDY_DIR (default runs/cifar10-cpu-study):

    teacher/, student/, student-wvel0/, student-wsc0/   run folders
    reference/                                          10,000 training images at 16x16 (PNG)
    samples/NAME/                                       `traflow sample` folders (+ fid.json)
    results.json, results.md, grid.png, timings.json    the study's answer

Usage: python benchmarks/cifar10_cpu_study.py [--study-dir DIR] [--data PATH] [--samples N]
       [--no-ablations] [--quick] [--workers N] [--teacher RUN] [--student RUN] [--rows NAMES]
  --data PATH: the CIFAR-10 training images, as an EDM-layout zip or folder (CLASS/NNNN.jpg and
     dataset.json) or torchvision's cifar-10-batches-py folder. Without it, torchvision's copy
     under traflow's data root ($TRAFLOW_DATA or ~/.cache/traflow/data, in cifar10/) if there.
  --quick: a few steps of everything, for the test suite.
  --workers N: measure N rows at once, each command on OMP_NUM_THREADS/N threads (default 1).
     On 2 cores, two 1-thread workers measure Inception features ~15% faster than one 2-thread
     process (0.27 s/image each, against 0.16 s/image for the one). The numbers do not change.
     The reference's statistics are measured once, beside the samples, before any FID row.
  --teacher RUN / --student RUN: measure finished runs (models/cifar10-cpu/teacher, .../student)
     instead of training and distilling the study's own.
  --rows NAMES: only these rows, comma-separated (student-nfe1,student-nfe2,teacher-rk45, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PRESET = "cifar10-cpu"
NOISE_SEED = 0  # the noises every row samples (the teachers of the recorded studies: seed 0)
ABLATIONS = {"student-wvel0": "distill.traflow.w_vel=0", "student-wsc0": "distill.traflow.w_sc=0"}


@dataclass
class Study:
    root: Path
    data: Path
    samples: int = 5000
    reference: int = 10_000
    ablations: bool = True
    quick: bool = False
    workers: int = 1
    teacher: Path | None = None  # a finished teacher run (models/cifar10-cpu/teacher): no training
    student: Path | None = None  # a finished student run (models/cifar10-cpu/student): no distill
    rows: tuple[str, ...] | None = None  # measure only these sample rows (None: every row)
    timings: dict[str, float] = field(default_factory=dict)
    planned: int = 0  # rows this run measures (set by run)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- bookkeeping ------------------------------------------------------------------------
    def traflow(self, stage: str, *args: object) -> str:
        """Run `traflow ARGS` (stdout returned), adding its wall time to the stage's total."""
        command = [sys.executable, "-m", "traflow_cli", *map(str, args)]
        print(f"[study] {stage}: traflow {' '.join(map(str, args))}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=self.env)
        self.add_time(stage, time.perf_counter() - began)
        if done.returncode != 0:
            raise SystemExit(f"[study] {stage} failed (exit {done.returncode}); fix the cause and "
                             "re-run the study to continue")
        return done.stdout

    @property
    def env(self) -> dict[str, str]:
        """The commands' environment: with several workers, the threads are split between them
        (more threads than cores makes torch's spinning threads slow everything down)."""
        env = dict(os.environ)
        if self.workers > 1:
            total = int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
            env["OMP_NUM_THREADS"] = str(max(1, total // self.workers))
        return env

    def add_time(self, stage: str, seconds: float) -> None:
        with self._lock:
            path = self.root / "timings.json"
            saved = json.loads(path.read_text()) if path.is_file() else {}
            saved[stage] = round(saved.get(stage, 0.0) + seconds, 1)
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
            self.timings = saved

    def sets(self, *pairs: str) -> list[str]:
        return [a for pair in pairs for a in ("--set", pair)]

    @property
    def common(self) -> list[str]:
        """Settings every command shares: the data, and the shortened run for --quick."""
        quick = self.sets("teacher.duration_steps=4", "teacher.batch_size=8",
                          "teacher.checkpoint_every_steps=2", "teacher.log_every_steps=2",
                          "distill.duration_steps=2", "distill.batch_size=4",
                          "distill.trajectory_cache=8", "distill.checkpoint_every_steps=1",
                          "distill.log_every_steps=1", "distill.grid_steps=2",
                          "data.preload=false") if self.quick else []
        return ["--preset", PRESET, *self.sets(f"data.path={self.data}"), *quick]

    @property
    def teacher_dir(self) -> Path:
        """The teacher run the study distills and samples: --teacher, or its own."""
        return self.teacher or self.root / "teacher"

    def run_dir(self, run: str) -> Path:
        """A row's run folder: the teacher's, --student for the student, else the study's own."""
        if run == "teacher":
            return self.teacher_dir
        if run == "student" and self.student is not None:
            return self.student
        return self.root / run

    # -- stages -----------------------------------------------------------------------------
    def train_teacher(self) -> None:
        if self.teacher is None and not (self.root / "teacher" / "summary.json").is_file():
            self.traflow("teacher", "teacher", "train", "--out", self.root / "teacher",
                         *self.common)

    def distill(self, name: str, *extra: str) -> None:
        if name == "student" and self.student is not None:
            return
        spec = self.root / name / "spec.json"
        if spec.is_file():  # a finished or part-done student of another teacher is not ours
            recorded = json.loads(spec.read_text())["spec"]["distill"]["teacher"]
            check_same_model(self.root / name, recorded, self.teacher_dir, what="distilled from")
        if not (self.root / name / "summary.json").is_file():
            self.traflow(name, "distill", "--teacher", self.teacher_dir, "--out",
                         self.root / name, *self.common, *self.sets(*extra))

    def export_reference(self) -> Path:
        """Every fifth training image (1,000 per class), downscaled as the teacher saw them."""
        folder = self.root / "reference"
        count = 16 if self.quick else self.reference
        if len(list(folder.glob("*.png"))) == count:
            return folder
        sys.path.insert(0, str(REPO))
        from traflow_cli.data.images import open_image_dataset

        began = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        dataset = open_image_dataset("cifar10", path=self.data, resolution=16)
        stride = len(dataset) // count
        images, _ = dataset.get_batch(range(0, stride * count, stride))
        for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image).save(folder / f"{i:06d}.png")
        self.add_time("reference", time.perf_counter() - began)
        return folder

    @property
    def count(self) -> int:
        """Samples per row."""
        return 8 if self.quick else self.samples

    def sample(self, name: str, run: str, *args: object) -> Path:
        out = self.root / "samples" / name
        summary = out / "summary.json"
        if summary.is_file():
            made = json.loads(summary.read_text())
            check_same_model(out, made["model"], self.run_dir(run))
            if made["num_samples"] == self.count and sampled_seed(out) == NOISE_SEED:
                return out
        # Every row draws the noises of one seed, whatever seed its model was trained with:
        # PSNR against RK45 pairs sample i of each row with sample i of the teacher's.
        self.traflow(f"sample {name}", "sample", self.run_dir(run), "-n", self.count, "--out",
                     out, "--seed", NOISE_SEED, *args)
        return out

    def fid(self, name: str, samples: Path, reference: Path) -> dict:
        """The row's FID, measured again when its samples outgrew it (a larger --samples)."""
        path = samples / "fid.json"
        if not (path.is_file() and json.loads(path.read_text())["num_samples"] == self.count):
            self.traflow(f"fid {name}", "eval", "fid", samples, "--ref", reference, "--offline",
                         "--json")
        return json.loads(path.read_text())

    def reference_statistics(self, reference: Path) -> None:
        """Measure the reference's Inception statistics into traflow's FID cache, once, before
        any FID row: two workers' first FID rows would otherwise both measure all 10,000 images
        at the same time (they share the cache file, not the work)."""
        code = ("import sys; from traflow_cli.metrics.fid import CPU_BATCH; "
                "from traflow_cli.metrics.reference import reference_stats; "
                "reference_stats(sys.argv[1], mode='legacy_tensorflow', split='train', "
                "resolution=int(sys.argv[2]), batch_size=CPU_BATCH, allow_download=False)")
        size = Image.open(next(iter(sorted(reference.glob("*.png"))))).size[0]
        print(f"[study] reference statistics: {reference}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, str(reference), str(size)],
                              env=self.env, cwd=REPO)
        self.add_time("reference statistics", time.perf_counter() - began)
        if done.returncode != 0:
            raise SystemExit("[study] reference statistics failed; fix the cause and re-run")

    def sample_row(self, run: str, solver: str, k: int | None) -> Path:
        """The row's samples (written once): student jumps, or the teacher's Euler or RK45."""
        name = row_name(run, solver, k)
        if solver == "jump":
            return self.sample(name, run, "--nfe", k)
        if solver == "euler":
            return self.sample(name, run, "--solver", "euler", "--steps", k)
        return self.sample(name, run, "--solver", "rk45")

    # -- the whole study --------------------------------------------------------------------
    def run(self) -> dict:
        """Stages in the order of what they answer: the student at 1 and 2 NFE against the
        teacher's one step and its RK45 solve first, the other rows and the ablations after. A
        report is written after every measured row, so a study stopped part-way shows what it
        has measured."""
        self.train_teacher()
        reference = self.export_reference()
        plan = study_plan(quick=self.quick, ablations=self.ablations, rows=self.rows)
        self.planned = len(plan)
        if any(run == "student" for run, _, _ in plan):
            self.distill("student")
        measured: dict[int, tuple[str, str, Path, dict]] = {}
        out: dict = {}

        def measure(rows: list[tuple[int, str, str, int | None]]) -> None:
            nonlocal out
            for index, run, solver, k in rows:
                if run.startswith("student-w"):
                    self.distill(run, ABLATIONS[run])
                folder = self.sample_row(run, solver, k)
                fid = self.fid(folder.name, folder, reference)
                with self._lock:
                    measured[index] = (run, solver, folder, fid)
                    out = self.report([measured[i] for i in sorted(measured)], reference)

        main = [(i, *row) for i, row in enumerate(plan) if not row[0].startswith("student-w")]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            # First the reference statistics beside the main rows' samples (the teacher's RK45
            # solve is the longest of them), so no FID row measures the reference itself.
            todo = [row for row in plan if not (self.root / "samples" / row_name(*row)
                                                / "fid.json").is_file()]
            firsts = [pool.submit(lambda: [self.sample_row(*row[1:]) for row in main])]
            if todo:
                firsts.append(pool.submit(self.reference_statistics, reference))
            for future in firsts:
                future.result()
            # Then one task per main row, and one per ablation (its distillation, then its rows).
            tasks = [[row] for row in main]
            for name in ABLATIONS:
                rows = [(i, *row) for i, row in enumerate(plan) if row[0] == name]
                if rows:
                    tasks.append(rows)
            for future in [pool.submit(measure, rows) for rows in tasks]:
                future.result()
        return out

    def report(self, measured: list[tuple[str, str, Path, dict]], reference: Path) -> dict:
        rk45 = self.root / "samples" / "teacher-rk45"
        has_rk45 = any(folder == rk45 for _, _, folder, _ in measured)
        results = []
        for model, solver, folder, fid in measured:
            summary = json.loads((folder / "summary.json").read_text())
            results.append({"model": model, "solver": solver, "nfe": summary["nfe"],
                            "samples": folder.name, "fid": fid["fid"],
                            "num_samples": fid["num_samples"],
                            "psnr_vs_rk45_db": psnr_folders(folder, rk45) if has_rk45 else None,
                            "sample_seconds": summary["seconds"]})
        teacher = json.loads((self.teacher_dir / "summary.json").read_text())
        out = {"preset": PRESET, "data": str(self.data), "reference_images": str(reference),
               "reference_count": len(list(reference.glob("*.png"))),
               "teacher_steps": teacher["steps"], "rows": results, "timings_s": self.timings,
               "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
               "quick": self.quick, "complete": len(results) == self.planned}
        (self.root / "results.json").write_text(json.dumps(out, indent=1) + "\n")
        (self.root / "results.md").write_text(markdown_table(out))
        rows = [self.root / "samples" / name / "images" for name in
                ("teacher-rk45", "teacher-euler1", "student-nfe1", "student-nfe2")]
        if all(folder.is_dir() for folder in rows):
            save_grid(self.root / "grid.png", rows)
        return out


def sampled_seed(samples: Path) -> int | None:
    """The seed whose noises a sample folder holds (its spec.json), None if unreadable."""
    try:
        return int(json.loads((samples / "spec.json").read_text())["spec"]["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def row_name(run: str, solver: str, k: int | None) -> str:
    """The samples folder a row writes: student-nfe1, teacher-euler4, teacher-rk45, ..."""
    return {"jump": f"{run}-nfe{k}", "euler": f"teacher-euler{k}"}.get(solver, "teacher-rk45")


def study_plan(*, quick: bool, ablations: bool, rows: tuple[str, ...] | None
               ) -> list[tuple[str, str, int | None]]:
    """The rows to measure, (run, sampler, NFE), in the order of what they answer: the student at
    1 and 2 NFE against the teacher's one step and its RK45 solve first, the others after. A
    `rows` name outside the plan is a one-line SystemExit, before any work."""
    plan: list[tuple[str, str, int | None]] = [
        ("student", "jump", 1), ("teacher", "euler", 1), ("student", "jump", 2),
        ("teacher", "rk45", None), ("student", "jump", 4), ("teacher", "euler", 2),
        ("teacher", "euler", 4), ("teacher", "euler", 8)]
    if quick:  # one row of each kind of stage keeps the pipeline tested, in CI time
        plan = plan[:4]
    if ablations:
        plan += [(run, "jump", k) for run in ABLATIONS for k in (1, 2)]
    if rows is None:
        return plan
    missing = set(rows) - {row_name(*row) for row in plan}
    if missing:
        raise SystemExit(f"--rows: {', '.join(sorted(missing))} not in this study's plan "
                         "(--quick keeps four rows, --no-ablations drops the ablations)")
    return [row for row in plan if row_name(*row) in rows]


# Every row a study can measure (--rows chooses among them), in the plan's order.
ROWS = tuple(row_name(*row) for row in study_plan(quick=False, ablations=True, rows=None))


def check_same_model(folder: Path, recorded: str, model: Path, what: str = "made from") -> None:
    """Stop (one line) when a study folder's `folder` came from another run than `model`: its
    samples or student would otherwise be reported as `model`'s."""
    if Path(recorded).resolve() != model.resolve():
        raise SystemExit(f"[study] {folder} was {what} {recorded}, not {model}; use another "
                         f"--study-dir, or delete {folder} to measure again")


def psnr_folders(folder: Path, reference: Path) -> float:
    """PSNR (dB, peak 255) of a sample folder's PNGs against the same indices in `reference`."""
    names = sorted(p.name for p in (reference / "images").glob("*.png"))
    err, count = 0.0, 0
    for name in names:
        a = np.asarray(Image.open(folder / "images" / name), dtype=np.float64)
        b = np.asarray(Image.open(reference / "images" / name), dtype=np.float64)
        err += float(((a - b) ** 2).sum())
        count += a.size
    mse = err / count
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def save_grid(path: Path, folders: list[Path], columns: int = 10) -> None:
    """One row per folder (the same first `columns` sample indices), 2x upscaled, 2 px gaps."""
    columns = min(columns, *(len(list(f.glob("*.png"))) for f in folders))
    tiles = [[np.asarray(Image.open(f / f"{i:06d}.png")) for i in range(columns)] for f in folders]
    size, gap = tiles[0][0].shape[0] * 2, 2
    canvas = np.full(((size + gap) * len(tiles) - gap, (size + gap) * columns - gap, 3), 255,
                     dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            big = np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.NEAREST))
            canvas[r * (size + gap):r * (size + gap) + size,
                   c * (size + gap):c * (size + gap) + size] = big
    Image.fromarray(canvas).save(path)


def markdown_table(out: dict) -> str:
    lines = ["| model | sampler | NFE | FID | PSNR vs RK45 (dB) |", "|---|---|---:|---:|---:|"]
    for r in out["rows"]:
        psnr = ("(reference)" if r["samples"] == "teacher-rk45" else "(not yet)"
                if r["psnr_vs_rk45_db"] is None else f"{r['psnr_vs_rk45_db']:.2f}")
        lines.append(f"| {r['model']} | {r['solver']} | {r['nfe']:g} | {r['fid']:.2f} | {psnr} |")
    count = out["rows"][0]["num_samples"]
    lines.append("")
    lines.append(f"FID: {count:,} samples against {out['reference_count']:,} CIFAR-10 training "
                 "images (JPEG copy) at 16x16, clean-fid legacy_tensorflow protocol, offline "
                 "Inception. PSNR: the same noise through the teacher's RK45 solve.")
    return "\n".join(lines) + "\n"


def resolve_data(data: Path | None) -> Path:
    """The study's CIFAR-10 training images: --data, else torchvision's copy under traflow's
    data root; a one-line SystemExit when there is neither."""
    if data is None:
        sys.path.insert(0, str(REPO))
        from traflow_cli.data.images.factory import default_data_root

        data = default_data_root() / "cifar10" / "cifar-10-batches-py"
        if not data.is_dir():
            raise SystemExit(f"--data: no CIFAR-10 given and no torchvision copy at {data}; pass "
                             "--data with an EDM-layout zip or torchvision's cifar-10-batches-py")
    elif not data.exists():
        raise SystemExit(f"--data: nothing at {data}; pass an EDM-layout CIFAR-10 zip or folder, "
                         "or torchvision's cifar-10-batches-py folder")
    return data.resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-dir", type=Path, default=REPO / "runs" / "cifar10-cpu-study")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a finished teacher run to use instead of training one "
                        "(e.g. models/cifar10-cpu/teacher)")
    parser.add_argument("--student", type=Path, default=None,
                        help="a finished student run to measure instead of distilling one "
                        "(e.g. models/cifar10-cpu/student)")
    parser.add_argument("--rows", default=None,
                        help=f"measure only these rows, comma-separated: {', '.join(ROWS)}")
    args = parser.parse_args()
    if args.workers < 1:
        raise SystemExit(f"--workers: must be at least 1, got {args.workers}")
    rows = None if args.rows is None else tuple(r for r in map(str.strip, args.rows.split(",")) if r)
    unknown = sorted(set(rows or ()) - set(ROWS))
    if rows is not None and (not rows or unknown):
        raise SystemExit(f"--rows: unknown row {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(ROWS)}")
    study_plan(quick=args.quick, ablations=not (args.no_ablations or args.quick), rows=rows)
    for flag, run in (("--teacher", args.teacher), ("--student", args.student)):
        if run is not None and not (run / "summary.json").is_file():
            raise SystemExit(f"{flag}: {run} is not a finished run folder (no summary.json); "
                             "pass a run folder that train or distill completed")
    study = Study(root=args.study_dir.resolve(), data=resolve_data(args.data), samples=args.samples,
                  ablations=not (args.no_ablations or args.quick), quick=args.quick,
                  workers=args.workers,
                  teacher=None if args.teacher is None else args.teacher.resolve(),
                  student=None if args.student is None else args.student.resolve(), rows=rows)
    out = study.run()
    print((study.root / "results.md").read_text())
    print(json.dumps({"results": str(study.root / "results.json"), "rows": len(out["rows"])}))


if __name__ == "__main__":
    main()
