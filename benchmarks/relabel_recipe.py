"""Relabel stored results after a recipe's definition changed under the same name.

A method name in a results file means the recipe as it was when the run was made. When a recipe
changes, its old rows are renamed to the variant of the new recipe that reproduces them exactly,
e.g. ``zo-edge`` -> ``zo-edge+t_low=500+t_high=900``, and variants that now equal the recipe lose
their overrides, e.g. ``zo-edge+t_low=0+t_high=500`` -> ``zo-edge``. Only names change; every score
stays as measured, and the file records each change it went through (``relabelled``). The rows can
be regenerated bit-exactly with ``zo-edge bench quality --methods NEW-NAME`` at the recipes of the
last change. ``CHANGES`` lists every change in order; a file gets those it has not recorded yet.

    python benchmarks/relabel_recipe.py docs/results/*.json docs/results/lab/*.json \\
        --docs README.md docs/estimator-lab.md
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zo_edge.models.quality import complete_definitions, override_value  # noqa: E402
from zo_runtime.recipe import RECIPE_FIELDS, RECIPES, ZOODIP  # noqa: E402
from zo_runtime.outputs import write_json, write_text  # noqa: E402

# Every change of a recipe's definition, in order: (what the file records, the recipe before, after).
# History, not defaults: today's recipes are zo_runtime.recipe.RECIPES (the last "after").
_LOW_T = dict(ZOODIP, sg=False, lr=2e-2, t_low=0, t_high=500)
CHANGES = [
    ("zo-edge: t ~ U[500, 900) -> U[0, 500) (docs/estimator-lab.md, low timesteps)",
     {"zo-edge": dict(_LOW_T, t_low=500, t_high=900)}, {"zo-edge": _LOW_T}),
    ("zo-edge: estimates clipped at 2x their running typical length (docs/estimator-lab.md, heavy tails)",
     {"zo-edge": _LOW_T}, {"zo-edge": RECIPES["zo-edge"]}),
]
NAME_KEYS = ("method", "reference", "recipe", "variant")


def relabel(spec: str, change: int = -1) -> str:
    """The name after ``CHANGES[change]`` of the run ``spec`` named before it."""
    _, before, after = CHANGES[change]
    base, _, arm = spec.partition("@")  # a run trained on another provider keeps its '@PROVIDER'
    base, *overrides = base.split("+")
    if base not in before or any("=" not in o or o.partition("=")[0] not in ZOODIP for o in overrides):
        return spec
    old, new = before[base], after[base]
    given = {o.partition("=")[0]: override_value(*o.split("=", 1)) for o in overrides}
    added = [f"{k}={old[k]}" for k in RECIPE_FIELDS if k not in given and old[k] != new[k]]
    kept = [o for o in overrides if given[o.partition("=")[0]] != new[o.partition("=")[0]]]
    return "+".join([base, *kept, *added]) + (f"@{arm}" if arm else "")


def walk(node, renamed: dict, change: int):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in NAME_KEYS and isinstance(value, str):
                out[key] = relabel(value, change)
                if out[key] != value:
                    renamed[value] = out[key]
            elif key == "methods" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                out[key] = [relabel(v, change) for v in value]
                renamed.update({v: relabel(v, change) for v in value if relabel(v, change) != v})
            elif key == "relabelled":
                out[key] = value
            else:
                out[key] = walk(value, renamed, change)
        return out
    if isinstance(node, list):
        return [walk(v, renamed, change) for v in node]
    return node


def relabel_file(path: Path, first: int = 0) -> dict:
    """Apply to ``path`` every change from ``CHANGES[first]`` on that it has not recorded and whose
    'before' its runs were made with (``recipes`` in the report, where it has them) -> {old name:
    newest name}. Reports without ``recipes`` predate the first change, or name ``first``."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "runs" not in data:  # quality reports only
        return {}
    done = {r.get("change") for r in data.get("relabelled", [])}
    total: dict = {}
    for i, (change, before, after) in enumerate(CHANGES):
        if change in done or i < first:
            continue
        made = data.get("recipes")  # the definitions the runs were made with, where the report says
        if made is not None and any(complete_definitions(made).get(name) != fields
                                    for name, fields in complete_definitions(before).items()):
            continue
        if made is not None:
            data["recipes"] = {**made, **after}
        renamed: dict = {}
        data = walk(data, renamed, i)
        data["relabelled"] = [*data.get("relabelled", []), {"change": change, "renamed": renamed}]
        total = {old: renamed.get(new, new) for old, new in total.items()} | {
            k: v for k, v in renamed.items() if k not in total.values()}
    if total or len(data.get("relabelled", [])) > len(done):
        write_json(path, data)
    return total


def relabel_markers(path: Path, files: set[str]) -> int:
    """Table markers ``<!-- table: KIND FILE ARG -->`` whose ARG names a renamed method (the last change)."""
    text = path.read_text()
    pattern = re.compile(r"(<!-- table: \S+ (\S+) )(\S+)( -->)")
    count = 0

    def sub(m):
        nonlocal count
        if m.group(2) not in files or relabel(m.group(3)) == m.group(3):
            return m.group(0)
        count += 1
        return m.group(1) + relabel(m.group(3)) + m.group(4)

    new = pattern.sub(sub, text)
    if count:
        write_text(path, new)
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--docs", nargs="*", type=Path, default=[], help="Markdown files whose table markers to update")
    ap.add_argument("--first-change", type=int, default=0,
                    help="index in CHANGES of the first change to apply, for reports made after the earlier ones "
                         "that do not record their recipes")
    args = ap.parse_args()
    changed = set()
    for path in args.files:
        renamed = relabel_file(path, args.first_change)
        if renamed:
            changed.add(str(path))
            print(f"{path}: {renamed}")
    for doc in args.docs:
        print(f"{doc}: {relabel_markers(doc, changed)} table markers")


if __name__ == "__main__":
    main()
