"""The benchmark command runs and writes results.json in the agreed shape (timings are never asserted)."""
import json
import subprocess
import sys

from tests.helpers import ROOT


def test_bench_quick_writes_rows(embedded_folder, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "hot_swap_vs_reload.transformers",
                        "--models-dir", str(embedded_folder.parent), "--results", str(tmp_path / "results.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"] and data["date"]
    (row,) = data["results"]
    assert row["name"] == "hot_swap_vs_reload.transformers"
    assert set(row) >= {"ours", "reference", "ratio", "unit", "higher_is_better", "note"}
    assert row["ours"] > 0 and row["reference"] > 0
