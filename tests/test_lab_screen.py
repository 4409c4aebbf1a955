"""benchmarks/lab_screen.py: screens paired with stored baseline runs, another provider as its own arm."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lab_screen", ROOT / "benchmarks" / "lab_screen.py")
lab_screen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab_screen)

BASELINE = json.loads((ROOT / "docs/results/quality-seeds.json").read_text())


def _screen(method: str, provider: str | None, shift: float) -> dict:
    runs = [copy.deepcopy(r) for r in BASELINE["runs"] if r["method"] == "zo-edge" and r["seed"] == 0
            and any(c["unet_passes"] == 3000 for c in r["curve"])][:3]
    for r in runs:
        r["method"] = method
        for c in r["curve"]:
            c["subject_fidelity"] = min(1.0, c["subject_fidelity"] + shift)
    s = {k: BASELINE[k] for k in ("k", "n_refs", "prompts", "gen_steps", "guidance", "ti_steps", "generic_init")}
    return dict(s, methods=[method], runs=runs, complete=True, provider=provider)


def test_another_provider_is_its_own_arm_paired_with_the_cpu_runs():
    report = lab_screen.combine(BASELINE, "zo-edge", 3000, [_screen("zo-edge", "openvino", 0.0)])
    assert report["methods"] == ["zo-edge", "zo-edge@openvino"]
    (row,) = report["paired"]
    assert row["method"] == "zo-edge@openvino" and row["pairs"] == 3 and row["difference"] == 0
    assert report["reproduced"] == []  # another arm, not a rerun of the baseline


def test_a_cpu_rerun_that_does_not_reproduce_the_baseline_stops():
    lab_screen.combine(BASELINE, "zo-edge", 3000, [_screen("zo-edge", "cpu", 0.0)])  # reproduces
    with pytest.raises(SystemExit, match="not reproduced"):
        lab_screen.combine(BASELINE, "zo-edge", 3000, [_screen("zo-edge", None, 0.05)])


def test_a_provider_arm_is_not_a_method_to_run():
    from zo_edge.models import quality as q
    from zo_runtime.errors import UserError

    assert q.parse_method("zo-edge@openvino") == q.parse_method("zo-edge")
    with pytest.raises(UserError, match="--provider"):
        q.plan_jobs(["zo-edge@openvino"], [], [0], ["class"], [3000], 1000, 1)


def test_a_screen_on_another_bundle_is_the_arm_it_is_named():
    other = dict(_screen("zo-edge", "cpu", 0.0), train_bundle="/bundles/int4w")
    with pytest.raises(SystemExit, match="--arm"):
        lab_screen.combine(BASELINE, "zo-edge", 3000, [other])      # else it would pass for a rerun
    report = lab_screen.combine(BASELINE, "zo-edge", 3000, [other], arm="int4w")
    assert report["methods"] == ["zo-edge", "zo-edge@int4w"] and report["paired"][0]["pairs"] == 3


def test_baseline_runs_made_beside_a_screen_for_new_seeds_join_the_baseline():
    """More seeds: the screen ran the baseline too where nothing is stored; those runs pair with the variant's."""
    base_new = _screen("zo-edge", None, 0.0)
    variant = _screen("zo-edge+lr=0.03", None, 0.1)
    for s in (base_new, variant):
        for r in s["runs"]:
            r["seed"] = 7   # a seed the stored file does not have
    report = lab_screen.combine(BASELINE, "zo-edge", 3000, [base_new, variant])
    (row,) = report["paired"]
    assert row["pairs"] == 3 and report["baseline_from"]["run_beside_the_screens"] == 3
    assert report["reproduced"] == []
