"""benchmarks/compare_methods.py keeps one comparison per folder: re-running it continues that
comparison, and a folder made with another preset, teacher, budget or setting is refused before
any work (its rows would otherwise be printed under the new comparison's header)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"


def test_a_folder_of_another_comparison_is_refused(tmp_path: Path) -> None:
    out, teacher = tmp_path / "compare", tmp_path / "teacher"
    out.mkdir()
    settings = {"preset": "toy2d", "teacher": str(teacher.resolve()), "budget_s": 60.0,
                "set": [], "reflow": None, "agreement_samples": 1000, "fid_samples": 0}
    rows = {"traflow": {"method": "traflow", "metrics": {"nfe1": 0.2}}}
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}))
    command = [sys.executable, str(SCRIPT), "--teacher", str(teacher), "--out", str(out)]
    done = subprocess.run([*command, "--preset", "shapes32", "--budget-s", "60"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"[compare] {out} holds a comparison made with preset = "
                                   "'toy2d', not 'shapes32'; choose another --out")
    done = subprocess.run([*command, "--preset", "toy2d", "--budget-s", "120"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "budget_s = 60.0, not 120.0" in done.stderr
    # Nothing was started or rewritten.
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def _comparison(out: Path, teacher: Path, **args: object):
    import argparse
    import importlib.util

    loaded = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    defaults = {"preset": "cifar10-cpu", "teacher": teacher, "budget_s": 600.0, "set": [],
                "reflow": None, "agreement_samples": 500, "fid_samples": 0, "out": out,
                "methods": ["traflow"], "rk45_cache": None, "reference": None}
    return module.Comparison(argparse.Namespace(**{**defaults, **args}))


def test_fid_is_added_to_a_folder_measured_without_it_and_never_mixed(tmp_path: Path) -> None:
    """A comparison measured with PSNR alone takes FID later (its rows lack it, so they are
    measured again), but a folder with FID of N samples refuses another N."""
    out, teacher = tmp_path / "compare", tmp_path / "teacher"
    psnr_only = {f"nfe{n}": {"psnr_db": 20.0 + n} for n in (1, 2, 4)}
    out.mkdir()
    settings = {"preset": "cifar10-cpu", "teacher": str(teacher.resolve()), "budget_s": 600.0,
                "set": [], "reflow": None, "agreement_samples": 500, "fid_samples": 0}
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": {}}))
    comparison = _comparison(out, teacher, fid_samples=1000, reference=tmp_path)
    assert comparison.results["settings"]["fid_samples"] == 1000
    assert not comparison.measured(psnr_only)
    with_fid = {k: {**v, "fid": 40.0} for k, v in psnr_only.items()}
    assert comparison.measured(with_fid)
    assert not comparison.measured({**with_fid, "nfe4": psnr_only["nfe4"]})  # NFE 4 too
    comparison.save()
    with pytest.raises(SystemExit, match="fid_samples = 1000, not 2000"):
        _comparison(out, teacher, fid_samples=2000, reference=tmp_path)
