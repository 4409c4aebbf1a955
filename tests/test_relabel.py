"""benchmarks/relabel_recipe.py: stored runs renamed after a recipe's definition changed, scores kept."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("relabel_recipe", ROOT / "benchmarks" / "relabel_recipe.py")
rr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rr)


def test_each_change_renames_the_old_definition_to_the_variant_that_reproduces_it():
    assert rr.relabel("zo-edge", 0) == "zo-edge+t_low=500+t_high=900"
    assert rr.relabel("zo-edge+t_low=0+t_high=500", 0) == "zo-edge"
    assert rr.relabel("zo-edge", 1) == "zo-edge+clip=0.0"
    assert rr.relabel("zo-edge+clip=2.0", 1) == "zo-edge"
    assert rr.relabel("zo-edge+normalize=true", 1) == "zo-edge+normalize=true+clip=0.0"
    assert rr.relabel("zo-edge@openvino", 1) == "zo-edge+clip=0.0@openvino"
    assert rr.relabel("zoodip", 1) == "zoodip" and rr.relabel("ti", 1) == "ti"


def _report(path: Path, methods: list[str], **extra) -> Path:
    runs = [{"method": m, "subject": "red:striped:star", "seed": 0, "curve": [{"subject_fidelity": 0.5}]} for m in methods]
    path.write_text(json.dumps({"methods": methods, "runs": runs, **extra}))
    return path


def test_a_file_gets_the_changes_it_has_not_recorded_in_order_and_only_once(tmp_path):
    old = _report(tmp_path / "old.json", ["zo-edge", "zoodip"])  # made before either change
    assert rr.relabel_file(old) == {"zo-edge": "zo-edge+t_low=500+t_high=900+clip=0.0"}
    data = json.loads(old.read_text())
    assert [r["method"] for r in data["runs"]] == ["zo-edge+t_low=500+t_high=900+clip=0.0", "zoodip"]
    assert [r["change"] for r in data["relabelled"]] == [c for c, _, _ in rr.CHANGES]
    assert rr.relabel_file(old) == {} and json.loads(old.read_text()) == data  # idempotent


def test_a_report_that_records_its_recipes_gets_only_the_changes_after_them(tmp_path):
    made = {"zo-edge": rr.CHANGES[1][1]["zo-edge"]}  # made between the two changes
    mid = _report(tmp_path / "mid.json", ["zo-edge", "zo-edge+clip=2.0"], recipes=made)
    assert rr.relabel_file(mid) == {"zo-edge": "zo-edge+clip=0.0", "zo-edge+clip=2.0": "zo-edge"}
    assert json.loads(mid.read_text())["recipes"]["zo-edge"] == rr.CHANGES[-1][2]["zo-edge"]
    new = _report(tmp_path / "new.json", ["zo-edge"], recipes={"zo-edge": rr.CHANGES[-1][2]["zo-edge"]})
    assert rr.relabel_file(new) == {}
    assert [r["method"] for r in json.loads(new.read_text())["runs"]] == ["zo-edge"]
