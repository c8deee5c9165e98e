"""What a fault probe tries, across every subcommand: bad values, missing and corrupt files,
folders of the wrong kind, a second process, Ctrl-C.

Each bad input must end with exit code 2 (130 for Ctrl-C), exactly one line on stderr that names
the field or file, no traceback, no run folder created or altered, and the good runs it touched
still loading.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import OFFICIAL_FIXTURES, TINY_TOY, invoke

from traflow_cli import load_student, load_teacher
from traflow_cli.runfolder import RunLock


@dataclass
class Ctx:
    teacher: Path      # a finished toy teacher
    student: Path      # a finished toy student distilled from it
    samples: Path      # a finished `traflow sample` folder of the student
    files: Path        # bad inputs made once for the module
    tmp: Path          # this case's own scratch folder
    new: Path          # a folder that must not exist afterwards


def _write_bad_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "binary.toml").write_bytes(b"\xff\xfe\x00preset = 1\n\x80\x81")
    (folder / "broken.toml").write_text("[teacher\nlr = 1e-3\n")
    (folder / "garbage.npz").write_bytes(b"PK\x03\x04 this is not an archive" * 10)
    (folder / "truncated.pth").write_bytes(OFFICIAL_FIXTURES["official-nf16"][0].read_bytes()[:5000])
    (folder / "random.pth").write_bytes(bytes(range(256)) * 40)
    (folder / "not-a-run").mkdir(exist_ok=True)
    (folder / "not-a-run" / "notes.txt").write_text("my own files")
    (folder / "a-file").write_text("not a folder")
    bad_record = folder / "bad-record"
    (bad_record / "checkpoints").mkdir(parents=True, exist_ok=True)
    (bad_record / "spec.json").write_bytes(b'{"job": "teacher", "spec": {"net": ')
    binary_record = folder / "binary-record"
    binary_record.mkdir(exist_ok=True)
    (binary_record / "spec.json").write_bytes(bytes(range(200, 256)) * 3)


@pytest.fixture(scope="module")
def runs(toy_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("faults")
    student = base / "student"
    result = invoke("distill", "--teacher", toy_teacher, "--out", student, "--steps", "6",
                    "--device", "cpu", "--set", "distill.batch_size=64",
                    "--set", "distill.trajectory_cache=256", "--set", "distill.log_every_steps=3",
                    "--set", "distill.checkpoint_every_steps=3")
    assert result.exit_code == 0, result.output
    samples = base / "samples"
    result = invoke("sample", student, "-n", "200", "--out", samples)
    assert result.exit_code == 0, result.output
    _write_bad_files(base / "files")
    return {"teacher": toy_teacher, "student": student, "samples": samples, "files": base / "files"}


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, hidden lock files aside."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


Args = Callable[[Ctx], list]

# (id, argv, what the one error line must mention). {ids} name the fault, not the answer.
CASES: list[tuple[str, Args, str]] = [
    # teacher train: values
    ("train-lr-inf", lambda c: ["teacher", "train", "--out", c.new, "--set", "teacher.lr=inf"],
     "teacher.lr"),
    ("train-lr-nan", lambda c: ["teacher", "train", "--out", c.new, "--set", "teacher.lr=nan"],
     "teacher.lr"),
    ("train-batch-bool", lambda c: ["teacher", "train", "--out", c.new,
                                    "--set", "teacher.batch_size=true"], "teacher.batch_size"),
    ("train-batch-float", lambda c: ["teacher", "train", "--out", c.new,
                                     "--set", "teacher.batch_size=2.5"], "teacher.batch_size"),
    ("train-flag-int", lambda c: ["teacher", "train", "--out", c.new, "--set", "data.hflip=1"],
     "data.hflip"),
    ("train-unknown-field", lambda c: ["teacher", "train", "--out", c.new,
                                       "--set", "teacher.bogus=1"], "teacher.bogus"),
    ("train-steps-negative", lambda c: ["teacher", "train", "--out", c.new, "--steps", "-3"],
     "teacher.duration_steps"),
    ("train-set-syntax", lambda c: ["teacher", "train", "--out", c.new, "--set", "nonsense"],
     "--set"),
    ("train-size-mismatch", lambda c: ["teacher", "train", "--preset", "shapes32", "--out", c.new,
                                       "--set", "net.image_size=16"], "net.image_size"),
    # teacher train: preset files
    ("train-binary-preset", lambda c: ["teacher", "train", "--out", c.new,
                                       "--preset", c.files / "binary.toml"], "binary.toml"),
    ("train-broken-preset", lambda c: ["teacher", "train", "--out", c.new,
                                       "--preset", c.files / "broken.toml"], "broken.toml"),
    ("train-missing-preset", lambda c: ["teacher", "train", "--out", c.new,
                                        "--preset", c.files / "missing.toml"], "missing.toml"),
    ("train-unknown-preset", lambda c: ["teacher", "train", "--out", c.new, "--preset", "nope"],
     "--preset"),
    # teacher train: devices and data
    ("train-no-cuda", lambda c: ["teacher", "train", "--out", c.new, "--device", "cuda"],
     "runtime.device"),
    ("train-bf16-on-cpu", lambda c: ["teacher", "train", "--out", c.new, "--device", "cpu",
                                     "--set", "runtime.precision=bf16"], "runtime.precision"),
    ("train-missing-dataset", lambda c: ["teacher", "train", "--preset", "shapes32", "--out",
                                         c.new, "--set", "data.name=folder",
                                         "--set", f"data.path={c.files / 'no-images-here'}"],
     "no-images-here"),
    # teacher train: folders
    ("train-out-is-student", lambda c: ["teacher", "train", "--out", c.student], "--out"),
    ("train-out-is-foreign", lambda c: ["teacher", "train", "--out", c.files / "not-a-run"],
     "--out"),
    ("train-out-is-file", lambda c: ["teacher", "train", "--out", c.files / "a-file"], "--out"),
    ("train-resume-changed", lambda c: ["teacher", "train", "--out", c.teacher,
                                        "--set", "teacher.lr=0.5", *TINY_TOY], "teacher.lr"),
    # distill
    ("distill-no-teacher-folder", lambda c: ["distill", "--teacher", c.files / "nope", "--out",
                                             c.new], "distill.teacher"),
    ("distill-teacher-is-student", lambda c: ["distill", "--teacher", c.student, "--out", c.new],
     "distill.teacher"),
    ("distill-teacher-not-a-run", lambda c: ["distill", "--teacher", c.files / "not-a-run",
                                             "--out", c.new], "distill.teacher"),
    ("distill-teacher-corrupt-record", lambda c: ["distill", "--teacher", c.files / "bad-record",
                                                  "--out", c.new], "spec.json"),
    ("distill-net-override", lambda c: ["distill", "--teacher", c.teacher, "--out", c.new,
                                        "--set", "net.hidden=999"], "net.hidden"),
    ("distill-net-unknown", lambda c: ["distill", "--teacher", c.teacher, "--out", c.new,
                                       "--set", "net.bogus=1"], "net.bogus"),
    ("distill-image-preset", lambda c: ["distill", "--teacher", c.teacher, "--out", c.new,
                                        "--preset", "shapes32"], "--preset"),
    ("distill-all-weights-zero", lambda c: ["distill", "--teacher", c.teacher, "--out", c.new,
                                            "--set", "distill.w_out=0", "--set", "distill.w_vel=0",
                                            "--set", "distill.w_sc=0"], "distill"),
    ("distill-clip-reversed", lambda c: ["distill", "--teacher", c.teacher, "--out", c.new,
                                         "--set", "distill.lambda_clip=[10, 0.01]"], "distill"),
    ("distill-cache-negative", lambda c: ["distill", "--teacher", c.teacher, "--out", c.new,
                                          "--set", "distill.trajectory_cache=-1"],
     "distill.trajectory_cache"),
    ("distill-shared-solve-with-cache", lambda c: ["distill", "--teacher", c.teacher, "--out",
                                                   c.new, "--set", "distill.draws_per_solve=4"],
     "draws_per_solve"),  # the toy preset caches its solves
    ("distill-shared-solve-uneven", lambda c: ["distill", "--teacher", c.teacher, "--out", c.new,
                                               "--set", "distill.trajectory_cache=0",
                                               "--set", "distill.draws_per_solve=3"],
     "draws_per_solve"),
    ("distill-out-is-teacher", lambda c: ["distill", "--teacher", c.teacher, "--out", c.teacher],
     "--out"),
    # sample
    ("sample-no-run", lambda c: ["sample", c.files / "nope"], "no run folder"),
    ("sample-not-a-run", lambda c: ["sample", c.files / "not-a-run"], "not a run folder"),
    ("sample-corrupt-record", lambda c: ["sample", c.files / "bad-record"], "spec.json"),
    ("sample-binary-record", lambda c: ["sample", c.files / "binary-record"], "spec.json"),
    ("sample-out-is-teacher", lambda c: ["sample", c.student, "-n", "4", "--out", c.teacher],
     "--out"),
    ("sample-out-is-foreign", lambda c: ["sample", c.student, "-n", "4",
                                         "--out", c.files / "not-a-run"], "--out"),
    ("sample-times-nan", lambda c: ["sample", c.student, "--nfe", "2", "--times", "0,nan,1",
                                    "--out", c.new], "sample.times"),
    ("sample-times-count", lambda c: ["sample", c.student, "--nfe", "2", "--times", "0,1",
                                      "--out", c.new], "sample"),
    ("sample-times-text", lambda c: ["sample", c.student, "--times", "0,half,1", "--out", c.new],
     "--times"),
    ("sample-nfe-zero", lambda c: ["sample", c.student, "--nfe", "0", "--out", c.new],
     "sample.nfe"),
    ("sample-class-unconditional", lambda c: ["sample", c.student, "--class", "3", "-n", "4",
                                              "--out", c.new], "sample.class_label"),
    ("sample-format", lambda c: ["sample", c.student, "--format", "gif", "--out", c.new],
     "sample.format"),
    # eval
    ("agreement-no-student", lambda c: ["eval", "agreement", c.files / "nope", "--teacher",
                                        c.teacher], "no run folder"),
    ("agreement-no-teacher", lambda c: ["eval", "agreement", c.student, "--teacher",
                                        c.files / "nope"], "--teacher"),
    ("agreement-swapped", lambda c: ["eval", "agreement", c.teacher, "--teacher", c.student],
     "STUDENT"),
    ("toy-missing-npz", lambda c: ["eval", "toy", c.files / "missing.npz", "--teacher", c.teacher,
                                   "--out", c.new], "missing.npz"),
    ("toy-garbage-npz", lambda c: ["eval", "toy", c.files / "garbage.npz", "--teacher", c.teacher,
                                   "--out", c.new], "garbage.npz"),
    ("toy-no-student-folder", lambda c: ["eval", "toy", "--student", c.files / "nope"],
     "--student"),
    ("fid-no-samples", lambda c: ["eval", "fid", c.files / "nope.npz", "--ref", "cifar10"],
     "nope.npz"),
    ("fid-mode", lambda c: ["eval", "fid", c.samples, "--ref", "cifar10", "--mode", "bogus"],
     "eval.fid_mode"),
    # bench
    ("bench-batch-zero", lambda c: ["bench", "--batch-size", "0"], "bench.batch_size"),
    ("bench-no-teacher", lambda c: ["bench", "--teacher", c.files / "nope"], "--teacher"),
    ("bench-no-student", lambda c: ["bench", "--student", c.files / "nope"], "--student"),
    # teacher import
    ("import-missing-file", lambda c: ["teacher", "import", "rectified-flow",
                                       c.files / "missing.pth", "--out", c.new], "missing.pth"),
    ("import-truncated", lambda c: ["teacher", "import", "rectified-flow",
                                    c.files / "truncated.pth", "--out", c.new], "truncated.pth"),
    ("import-random-bytes", lambda c: ["teacher", "import", "rectified-flow",
                                       c.files / "random.pth", "--out", c.new], "random.pth"),
    ("import-family", lambda c: ["teacher", "import", "stylegan", c.files / "random.pth",
                                 "--out", c.new], "source"),
    ("import-net-override", lambda c: ["teacher", "import", "rectified-flow",
                                       OFFICIAL_FIXTURES["official-nf16"][0], "--out", c.new,
                                       "--set", "net.nf=3"], "net.nf"),
    ("import-over-trained", lambda c: ["teacher", "import", "rectified-flow",
                                       OFFICIAL_FIXTURES["official-nf16"][0], "--out", c.teacher],
     "--out"),
]


@pytest.mark.parametrize(("args", "mention"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
        args: Args, mention: str, runs: dict[str, Path], tmp_path: Path) -> None:
    ctx = Ctx(**runs, tmp=tmp_path, new=tmp_path / "new-run")
    before = {name: _snapshot(runs[name]) for name in ("teacher", "student", "samples")}
    foreign = _snapshot(runs["files"])
    result = invoke(*args(ctx))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and mention in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not ctx.new.exists()  # no run folder was made
    assert {name: _snapshot(runs[name]) for name in before} == before  # nor altered
    assert _snapshot(runs["files"]) == foreign
    load_teacher(runs["teacher"])  # the good runs still load
    load_student(runs["student"])


def test_there_are_at_least_forty_faults() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {tuple(c[1](Ctx(*[Path("x")] * 6))[:2]) for c in CASES}
    for command in (("teacher", "train"), ("teacher", "import"), ("eval", "toy"),
                    ("eval", "agreement"), ("eval", "fid")):
        assert command in commands, command
    for command in ("distill", "sample", "bench"):
        assert any(c[0] == command for c in commands), command


def test_a_second_process_on_a_run_folder_is_refused(runs: dict[str, Path], tmp_path: Path
                                                     ) -> None:
    with RunLock(runs["student"]):  # as a running job holds it
        result = invoke("distill", "--teacher", runs["teacher"], "--out", runs["student"],
                        "--steps", "6", "--set", "distill.batch_size=64",
                        "--set", "distill.trajectory_cache=256",
                        "--set", "distill.log_every_steps=3",
                        "--set", "distill.checkpoint_every_steps=3")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another traflow process" in lines[0], result.stderr


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(
        runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    missing = tmp_path / "no-such-images"
    result = invoke("teacher", "train", "--preset", "shapes32", "--out", out,
                    "--set", "data.name=folder", "--set", f"data.path={missing}")
    assert result.exit_code == 2 and str(missing) in result.stderr
    assert not (out / "spec.json").exists()
    result = invoke("teacher", "train", "--preset", "shapes32", "--out", out, "--steps", "2",
                    "--set", "teacher.log_every_steps=1", "--set", "teacher.checkpoint_every_steps=1")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "spec.json").read_text())["spec"]["data"]["name"] == "shapes32"
