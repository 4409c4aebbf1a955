"""The README's and docs' result tables are the ones their results files give (benchmarks/readme_tables.py)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tables_match_their_results_files():
    tool = load_tool()
    assert tool.main(["--check"]) == 0, "run: python benchmarks/readme_tables.py"


def test_a_changed_results_file_is_caught(tmp_path, monkeypatch):
    tool = load_tool()
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    (results / "p.json").write_text('{"set": {"shape": 1, "colour": 1, "pattern": 1, "background": 1, '
                                    '"all_four": 1, "images": 3}}')
    doc = tmp_path / "README.md"
    doc.write_text("x\n<!-- table: prompts docs/results/p.json -->\nstale\n<!-- end table -->\n")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    assert tool.main(["--check"]) == 1 and "stale" in doc.read_text()
    assert tool.main([]) == 0 and "| set | 100.0 |" in doc.read_text() and tool.main(["--check"]) == 0
