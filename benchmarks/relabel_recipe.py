"""Relabel stored results after a recipe's definition changed under the same name.

A method name in a results file means the recipe as it was when the run was made. When a recipe
changes (the default ``zo-edge`` moved from PUTS's t ~ U[500, 900) to t ~ U[0, 500)), its old
rows are renamed to the variant of today's recipe that reproduces them exactly, e.g. ``zo-edge``
-> ``zo-edge+t_low=500+t_high=900``, and variants that now equal the recipe lose their overrides,
e.g. ``zo-edge+t_low=0+t_high=500`` -> ``zo-edge``. Only names change; every score stays as
measured, and the file records what was renamed (``relabelled``). The rows can be regenerated
bit-exactly with ``zo-edge bench quality --methods NEW-NAME``.

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

from zo_runtime.recipe import RECIPE_FIELDS, RECIPES, ZOODIP  # noqa: E402
from zo_runtime.outputs import write_json, write_text  # noqa: E402

# The recipes as they were before the change this script records (history, not a default).
BEFORE = {"zo-edge": dict(ZOODIP, sg=False, lr=2e-2, t_low=500, t_high=900)}
CHANGE = "zo-edge: t ~ U[500, 900) -> U[0, 500) (docs/estimator-lab.md, low timesteps)"
NAME_KEYS = ("method", "reference", "recipe", "variant")


def _value(key: str, text: str):
    kind = type(ZOODIP[key])
    if kind is bool:
        return text.lower() in ("true", "on", "1")
    return kind(text)


def relabel(spec: str) -> str:
    """The name under today's recipes of the run ``spec`` named under BEFORE."""
    base, *overrides = spec.split("+")
    if base not in BEFORE or any("=" not in o or o.partition("=")[0] not in ZOODIP for o in overrides):
        return spec
    old, new = BEFORE[base], RECIPES[base]
    given = {o.partition("=")[0]: _value(*o.split("=", 1)) for o in overrides}
    added = [f"{k}={old[k]}" for k in RECIPE_FIELDS if k not in given and old[k] != new[k]]
    kept = [o for o in overrides if given[o.partition("=")[0]] != new[o.partition("=")[0]]]
    return "+".join([base, *added, *kept])


def walk(node, renamed: dict):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in NAME_KEYS and isinstance(value, str):
                out[key] = relabel(value)
                if out[key] != value:
                    renamed[value] = out[key]
            elif key == "methods" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                out[key] = [relabel(v) for v in value]
                renamed.update({v: relabel(v) for v in value if relabel(v) != v})
            else:
                out[key] = walk(value, renamed)
        return out
    if isinstance(node, list):
        return [walk(v, renamed) for v in node]
    return node


def relabel_file(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or any(r.get("change") == CHANGE for r in data.get("relabelled", [])):
        return {}
    renamed: dict = {}
    new = walk(data, renamed)
    if renamed:
        new["relabelled"] = [*data.get("relabelled", []), {"change": CHANGE, "renamed": renamed}]
        write_json(path, new)
    return renamed


def relabel_markers(path: Path, files: set[str]) -> int:
    """Table markers ``<!-- table: KIND FILE ARG -->`` whose ARG names a renamed method."""
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
    args = ap.parse_args()
    changed = set()
    for path in args.files:
        renamed = relabel_file(path)
        if renamed:
            changed.add(str(path))
            print(f"{path}: {renamed}")
    for doc in args.docs:
        print(f"{doc}: {relabel_markers(doc, changed)} table markers")


if __name__ == "__main__":
    main()
