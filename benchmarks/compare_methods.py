"""Every distillation objective from one teacher at equal compute: the table of docs/RESULTS.md.

For each method (`distill.method`), `traflow bench` times one distillation step on this machine;
the method then distils for as many steps as fit in the same wall-clock budget (--budget-s), from
the same teacher, seed and preset. Each student is measured the same way:
  - toy presets: sliced Wasserstein distance (SW2) and MMD to fresh true samples at NFE 1, 2, 4
    (`traflow eval toy`);
  - image presets: PSNR against the teacher's RK45 solve on the same noise at NFE 1, 2, 4
    (`traflow eval agreement`; with --rk45-cache FILE, benchmarks/middle_times.py on its cached
    RK45 solves instead: 2 jumps meet at 0.5), and with --fid-samples N, FID at NFE 1, 2
    and 4 against --reference (added to the rows of a folder measured without it).
Every run of one teacher shares one trajectory cache (distill.trajectory_cache_file), so the
teacher is solved once, not once per method.
--reflow RUN adds "reflow+METHOD" rows: the best method (by the NFE 1 score) distilled from the
reflowed teacher RUN for the best row's steps (same network, same step; the reflow's own cost is
reported apart).
Every stage is skipped when its output is there: re-run the command to continue.

Usage: python benchmarks/compare_methods.py --preset toy2d --teacher RUN --budget-s 300
       [--methods traflow,ctm,lagrangian,eulerian] [--reflow RUN] [--out DIR] [--set k=v ...]
       [--fid-samples N --reference DIR]
Run it on one thread (OMP_NUM_THREADS=1) on a quiet machine: the step costs set the budgets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("traflow", "ctm", "lagrangian", "eulerian")
FID_NFE = (1, 2, 4)


def traflow(*args: object, stdout_json: bool = True) -> dict:
    """Run `traflow ARGS --json` and return its JSON (one line: SystemExit naming the command)."""
    command = [sys.executable, "-m", "traflow_cli", *map(str, args)]
    print(f"[compare] traflow {' '.join(map(str, args))}", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # progress: on stderr
    if done.returncode != 0:
        raise SystemExit(f"[compare] traflow {args[0]} failed (exit {done.returncode}; its error "
                         "is above); fix the cause and re-run to continue")
    return json.loads(done.stdout) if stdout_json else {}


class Comparison:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "results.json"
        self.results: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.sets = [a for pair in args.set for a in ("--set", pair)]
        # What every row was measured under: a folder holding another comparison (another preset,
        # teacher, budget or setting) would print its rows under this one's header.
        settings = {"preset": args.preset, "teacher": str(args.teacher.resolve()),
                    "budget_s": args.budget_s, "set": list(args.set),
                    "reflow": None if args.reflow is None else str(args.reflow.resolve()),
                    "agreement_samples": args.agreement_samples,
                    "fid_samples": args.fid_samples}
        recorded = self.results.setdefault("settings", settings)
        if not recorded.get("fid_samples") and args.fid_samples:
            recorded["fid_samples"] = args.fid_samples  # FID is added to the rows, not mixed
        changed = [key for key in settings if recorded.get(key) != settings[key]]
        if changed:
            key = changed[0]
            raise SystemExit(f"[compare] {self.out} holds a comparison made with {key} = "
                             f"{recorded.get(key)!r}, not {settings[key]!r}; choose another --out")

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1) + "\n")
        (self.out / "results.md").write_text(self.markdown())

    def step_seconds(self, method: str, teacher: Path) -> dict:
        """Seconds per distillation step of `method` (bench's train row with the cache, or the
        per-step solve where the spec has no cache), at the preset's distillation batch."""
        key = f"bench:{method}:{teacher}"
        if key not in self.results:
            spec = traflow("distill", "--teacher", teacher, "--preset", self.args.preset,
                           *self.sets, "--set", f"distill.method={method}", "--out",
                           self.out / "dry", "--dry-run")
            distill = spec["distill"]
            batch, cached = distill["batch_size"], distill["trajectory_cache"] > 0
            bench = traflow("bench", "--teacher", teacher, "--preset", self.args.preset,
                            *self.sets, "--set", f"distill.method={method}", "--batch-size",
                            batch, "--set", "bench.rk45=false", "--set", "bench.student_nfe=[1]",
                            "--set", "bench.teacher_steps=[1]", "--json")
            rows = [r for r in bench["rows"] if r["task"] == "train" and r["model"] == "student"]
            # The row the distillation will run: with the cache where the spec has one.
            row = next(r for r in rows if (r["teacher_solve"] == "cached") == cached)
            self.results[key] = {"step_s": row["latency_ms"] / 1000, "batch": batch,
                                 "teacher_solve": row["teacher_solve"],
                                 "evaluations": row.get("evaluations")}
            self.save()
        return self.results[key]

    def distill(self, name: str, method: str, teacher: Path, cost: dict | None = None) -> dict:
        """The student of `method` from `teacher` for the budget's steps (at `cost`, default:
        timed by bench), and its measurements."""
        row = self.results.setdefault("rows", {}).get(name)
        if row and "metrics" in row:
            if not self.measured(row["metrics"]):  # FID asked for after the row was measured
                self.add_fid(self.out / name, row["metrics"])
                self.save()
            return row
        cost = cost or self.step_seconds(method, teacher)
        steps = max(1, math.floor(self.args.budget_s / cost["step_s"]))
        run = self.out / name
        began = time.perf_counter()
        tag = hashlib.sha256(str(teacher.resolve()).encode()).hexdigest()[:12]
        cache = self.out / f"trajectories-{teacher.name}-{tag}.safetensors"
        if not (run / "summary.json").is_file():
            traflow("distill", "--teacher", teacher, "--out", run, "--preset", self.args.preset,
                    *self.sets, "--set", f"distill.method={method}",
                    "--set", f"distill.trajectory_cache_file={cache}",
                    "--set", f"distill.duration_steps={steps}",
                    "--set", f"distill.checkpoint_every_steps={max(1, steps // 4)}",
                    stdout_json=False)
        summary = json.loads((run / "summary.json").read_text())
        row = {"method": method, "teacher": str(teacher), "step_s": cost["step_s"],
               "steps": steps, "distill_wall_s": summary.get("wall_time_s",
                                                            time.perf_counter() - began),
               "metrics": self.measure(run, teacher)}
        self.results["rows"][name] = row
        self.save()
        return row

    def measured(self, metrics: dict) -> bool:
        """Whether a row has every measurement this comparison asks for."""
        if not self.args.fid_samples or self.args.preset.startswith("toy"):
            return True
        return all("fid" in metrics.get(f"nfe{nfe}", {}) for nfe in FID_NFE)

    def measure(self, run: Path, teacher: Path) -> dict:
        # Images: every row against the parent teacher's RK45, reflow rows included (their own
        # teacher's RK45 would be another reference).
        reference_teacher = self.args.teacher
        if self.args.preset.startswith("toy"):
            toy = traflow("eval", "toy", "--student", run, "--teacher", teacher, "--json",
                          "--out", run / "eval")
            return {f"nfe{r['nfe']}": {"sw2": r["sliced_wasserstein"], "mmd": r["mmd"]}
                    for r in toy["rows"] if r["model"] == "student"}
        if self.args.rk45_cache:
            out = self.middle_times(run, reference_teacher)
        else:
            agreement = traflow("eval", "agreement", run, "--teacher", reference_teacher, "--json",
                                "-n", self.args.agreement_samples)
            out = {f"nfe{r['nfe']}": {"psnr_db": r["psnr_db"]}
                   for r in agreement["rows"] if r["model"] == "student"}
        if self.args.fid_samples:
            self.add_fid(run, out)
        return out

    def add_fid(self, run: Path, metrics: dict) -> None:
        """FID of --fid-samples samples at each of FID_NFE into `metrics`, sampled and measured
        where the row's folder has none yet."""
        for nfe in FID_NFE:
            folder = run / f"samples-nfe{nfe}"
            if not (folder / "fid.json").is_file():
                traflow("sample", run, "--nfe", nfe, "-n", self.args.fid_samples, "--out",
                        folder, "--json")
                traflow("eval", "fid", folder, "--ref", self.args.reference, "--offline",
                        "--json")
            fid = json.loads((folder / "fid.json").read_text())["fid"]
            metrics.setdefault(f"nfe{nfe}", {})["fid"] = fid

    def middle_times(self, run: Path, teacher: Path) -> dict:
        """PSNR against the cached RK45 solves at NFE 1, 2 (meeting at 0.5) and 4."""
        script = Path(__file__).resolve().parent / "middle_times.py"
        command = [sys.executable, str(script), str(teacher), str(run), "-n",
                   str(self.args.agreement_samples), "--cache", str(self.args.rk45_cache)]
        print(f"[compare] {' '.join(command[1:])}", file=sys.stderr, flush=True)
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        sweep = json.loads(done.stdout)
        return {"nfe1": {"psnr_db": sweep["nfe1_psnr"]},
                "nfe2": {"psnr_db": sweep["middle"]["0.5"]["nfe2_psnr"]},
                "nfe4": {"psnr_db": sweep["nfe4_psnr"]}}

    def run(self) -> None:
        # Every step cost first, back to back: their ratios are what the budgets rest on.
        for method in self.args.methods:
            self.step_seconds(method, self.args.teacher)
        for method in self.args.methods:
            self.distill(method, method, self.args.teacher)
        if self.args.reflow:
            rows = self.results["rows"]
            best = min((rows[m] for m in self.args.methods), key=self.score)["method"]
            # The reflowed teacher has its parent's network, so the best method's step costs
            # what it cost from the parent: its timing is reused, not taken again at another
            # moment (a quieter machine would give the reflow row more steps than its rival).
            self.distill(f"reflow+{best}", best, self.args.reflow,
                         cost=self.step_seconds(best, self.args.teacher))
        self.save()

    def score(self, row: dict) -> float:
        """Lower is better: SW2 at NFE 1 on toys, minus the PSNR at NFE 1 on images."""
        nfe1 = row["metrics"]["nfe1"]
        return nfe1["sw2"] if "sw2" in nfe1 else -nfe1["psnr_db"]

    def markdown(self) -> str:
        rows = self.results.get("rows", {})
        toy = self.args.preset.startswith("toy")
        metric = "SW2 (MMD)" if toy else "PSNR vs RK45, dB" + (" (FID)" if self.args.fid_samples
                                                               else "")
        lines = [f"| method | step (s) | steps in {self.args.budget_s:g} s | "
                 f"NFE 1 {metric} | NFE 2 | NFE 4 |", "|---|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            cells = []
            for nfe in ("nfe1", "nfe2", "nfe4"):
                m = row.get("metrics", {}).get(nfe, {})
                if toy:
                    cells.append(f"{m['sw2']:.3f} ({m['mmd']:.3f})" if m else "")
                else:
                    fid = f" ({m['fid']:.1f})" if "fid" in m else ""
                    cells.append(f"{m['psnr_db']:.2f}{fid}" if m else "")
            lines.append(f"| {name} | {row['step_s']:.3f} | {row['steps']} | " + " | ".join(cells)
                         + " |")
        return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, required=True,
                        help="wall-clock seconds of distillation per method (on this machine)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reflow", type=Path, default=None,
                        help="a reflowed teacher (traflow teacher reflow): adds reflow+BEST")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: runs/compare-PRESET)")
    parser.add_argument("--set", action="append", default=[],
                        help="section.key=value for every method's run (so no distill.traflow.* "
                             "setting: the other methods refuse it)")
    parser.add_argument("--agreement-samples", type=int, default=1000)
    parser.add_argument("--rk45-cache", type=Path, default=None,
                        help="middle_times.py's RK45 cache for this teacher and sample count")
    parser.add_argument("--fid-samples", type=int, default=0)
    parser.add_argument("--reference", type=Path, default=None)
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(METHODS)}")
    if args.budget_s <= 0:
        raise SystemExit(f"--budget-s: must be positive, got {args.budget_s}")
    if args.fid_samples and args.reference is None:
        raise SystemExit("--fid-samples needs --reference (a folder of reference images)")
    if args.out is None:
        args.out = Path("runs") / f"compare-{Path(args.preset).stem}"
    comparison = Comparison(args)
    comparison.run()
    print(comparison.markdown())


if __name__ == "__main__":
    main()
