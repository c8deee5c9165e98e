"""benchmarks/compare_methods.py keeps one comparison per folder: re-running it continues that
comparison, and a folder made with another preset, teacher, budget or setting is refused before
any work (its rows would otherwise be printed under the new comparison's header)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
