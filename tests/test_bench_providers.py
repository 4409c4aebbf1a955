"""benchmarks/bench_providers.py: runs of two onnxruntime builds that took turns, combined as rounds."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("bench_providers", ROOT / "benchmarks" / "bench_providers.py")
bp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bp)


def _part(path: Path, provider: str, median: float) -> str:
    row = {"bundle": "b", "path": "p", "provider": provider, "target": "portable", "precision": "int8w",
           "resolution": 256, "batch": 1, "median_s": median, "best_s": median, "repeats": 5, "threads": 2,
           "load_avg_1min": [0.1, 0.2]}
    path.write_text(json.dumps({"runs": [{"command": provider}], "rows": [row]}))
    return str(path)


def test_turns_become_rounds_and_each_row_is_compared_within_its_round(tmp_path):
    parts = [_part(tmp_path / "c1.json", "cpu", 2.0), _part(tmp_path / "o1.json", "openvino", 1.0),
             _part(tmp_path / "c2.json", "cpu", 4.0), _part(tmp_path / "o2.json", "openvino", 1.0)]
    data = bp.combine(parts, str(tmp_path / "all.json"))
    assert [r["round"] for r in data["rows"]] == [1, 1, 2, 2] and len(data["runs"]) == 4
    lines = bp.table(data).splitlines()[2:]
    assert "| 0.50x |" in lines[1] and "| 0.25x |" in lines[3]
