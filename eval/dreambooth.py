"""The DreamBooth evaluation protocol, as the paper uses it (torch-free).

* The DreamBooth dataset (github.com/google/dreambooth): 30 subjects, one folder of 4-6 images
  each, and ``prompts_and_classes.txt`` listing ``subject_name,class`` and the two prompt lists.
  Nine subjects (the cats and dogs) are *live*; the other 21 are *objects*.
* 25 prompts per subject: :data:`LIVE_PROMPTS` or :data:`OBJECT_PROMPTS`, templates with ``{0}`` =
  the unique token (here the textual-inversion placeholder) and ``{1}`` = the class word.
* For each subject: personalize on its images, generate ``images_per_prompt`` images for each of its
  25 prompts, score them (CLIP-I, CLIP-T, DINO, DINO-inter: :mod:`zo_edge.eval.metrics`), then
  report mean and standard deviation over the subjects (the paper's Table 1).

Dataset layout read by :func:`load_subjects`::

    dataset/
      prompts_and_classes.txt      optional (also looked for one level up); else classes= or the
                                   built-in official subject -> class list
      backpack/00.jpg 01.jpg ...   one folder per subject, images at its top level
      dog/...

:func:`run_dreambooth` is the resumable driver; personalization, generation and scoring are
injected callables so it can run the real pipeline or test fakes. Its output::

    out_dir/
      summary.json  summary.md      the aggregate (re-written after every subject)
      <subject>/prompts.txt         the subject's 25 prompts, one a line
      <subject>/personalize/        work folder handed to personalize_fn
      <subject>/generated/          generate_fn writes its images here
      <subject>/result.json         written atomically when the subject is done; its presence
                                    (same method, prompts and images_per_prompt) skips the subject
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from zo_runtime.data import IMAGE_SUFFIXES
from zo_runtime.errors import UserError
from zo_runtime.outputs import write_json, write_text

# The official prompt lists (google/dreambooth, dataset/prompts_and_classes.txt).
OBJECT_PROMPTS = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
]

LIVE_PROMPTS = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
]

# The official list (subject folder -> class word); live subjects are the cats and dogs.
DREAMBOOTH_CLASSES = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl", "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock",
    "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog",
    "dog7": "dog", "dog8": "dog", "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy", "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy",
    "red_cartoon": "cartoon", "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}
LIVE_CLASSES = frozenset({"dog", "cat", "puppy", "kitten"})
CLASSES_FILE = "prompts_and_classes.txt"
METRICS = ("clip_i", "clip_t", "dino", "dino_inter")
METRIC_NAMES = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO", "dino_inter": "DINO-inter"}
RESULT = "result.json"


@dataclass(frozen=True)
class Subject:
    """One DreamBooth subject: its folder name, class word, live/object, and image folder."""
    name: str
    class_word: str
    live: bool
    folder: Path | None = None

    @property
    def kind(self) -> str:
        return "live" if self.live else "object"

    def images(self) -> list[Path]:
        if self.folder is None:
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# -- prompts -------------------------------------------------------------------------------------

def format_prompts(templates: Sequence[str], placeholder: str, class_word: str,
                   include_class_word: bool = True) -> list[str]:
    """Fill DreamBooth templates: ``"a {0} {1} in the jungle"`` -> ``"a <dog> dog in the jungle"``
    (or ``"a <dog> in the jungle"`` with ``include_class_word=False``)."""
    out = []
    for t in templates:
        s = t.format(placeholder, class_word if include_class_word else "")
        out.append(" ".join(s.split()))
    return out


def subject_prompts(subject: Subject, placeholder: str, include_class_word: bool = True,
                    templates: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The subject's 25 evaluation prompts (live or object list)."""
    t = (templates or {}).get(subject.kind) or (LIVE_PROMPTS if subject.live else OBJECT_PROMPTS)
    return format_prompts(t, placeholder, subject.class_word, include_class_word)


# -- dataset -------------------------------------------------------------------------------------

_TEMPLATE_LINE = re.compile(r"""^\s*(['"])(.*?)\1\s*(?:\.format\(.*\))?\s*,?\s*$""")


def parse_prompts_and_classes(path: str | Path) -> tuple[dict[str, tuple[str, bool | None]], dict[str, list[str]]]:
    """Read the official ``prompts_and_classes.txt``.

    Returns ``(classes, templates)``: ``classes`` maps subject name -> (class word, live or None
    when the file does not say; a third column ``live``/``object`` says); ``templates`` maps
    ``"object"``/``"live"`` to the prompt templates found under the "Object Prompts" / "Live
    Subject Prompts" headings (absent when the file has none)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {str(path)!r}: {e}") from None
    classes: dict[str, tuple[str, bool | None]] = {}
    templates: dict[str, list[str]] = {}
    section = None
    for raw in lines:
        line = raw.strip()
        low = line.lower()
        if not line:
            continue
        if low.replace(" ", "").startswith("subject_name,class"):
            section = "classes"
            continue
        if "prompt" in low and "{" not in line and "'" not in line and '"' not in line:
            section = "live" if "live" in low else ("object" if "object" in low else section)
            continue
        if section in ("live", "object"):
            m = _TEMPLATE_LINE.match(line)
            if m and "{0}" in m.group(2):
                templates.setdefault(section, []).append(m.group(2))
            continue
        if section == "classes" or (section is None and "," in line):
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 2 or not parts[0] or not parts[1]:
                section = None
                continue
            live = None
            if len(parts) > 2 and parts[2].lower() in ("live", "object"):
                live = parts[2].lower() == "live"
            classes[parts[0]] = (parts[1], live)
    return classes, templates


def parse_class_mapping(items: Iterable[str]) -> dict[str, tuple[str, bool | None]]:
    """``--class`` values: ``NAME=CLASS`` or ``NAME=CLASS:live`` / ``NAME=CLASS:object``."""
    out: dict[str, tuple[str, bool | None]] = {}
    for item in items:
        name, sep, rest = str(item).partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise UserError(f"--class {item!r}: want NAME=CLASS or NAME=CLASS:live|object")
        word, _, kind = rest.partition(":")
        kind = kind.strip().lower()
        if kind not in ("", "live", "object"):
            raise UserError(f"--class {item!r}: the kind after ':' must be live or object")
        out[name.strip()] = (word.strip(), None if not kind else kind == "live")
    return out


def load_subjects(dataset_dir: str | Path, classes: Mapping[str, Any] | None = None,
                  names: Sequence[str] | None = None) -> tuple[list[Subject], dict[str, list[str]]]:
    """The subjects of a DreamBooth-layout dataset folder, and any prompt templates its
    ``prompts_and_classes.txt`` gives. Class words come from ``classes`` (name -> class word, or
    (class word, live)), else the file, else :data:`DREAMBOOTH_CLASSES` (the official subject
    names); ``names`` selects subjects (default: every subject folder). Live unless said otherwise
    in the file or ``classes``: class word in :data:`LIVE_CLASSES`."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise UserError(f"dataset folder {str(root)!r} does not exist")
    # Class words: classes= over prompts_and_classes.txt over the built-in official list.
    known: dict[str, tuple[str, bool | None]] = {k: (v, None) for k, v in DREAMBOOTH_CLASSES.items()}
    templates: dict[str, list[str]] = {}
    for cand in (root / CLASSES_FILE, root.parent / CLASSES_FILE):
        if cand.is_file():
            from_file, templates = parse_prompts_and_classes(cand)
            known.update(from_file)
            break
    for k, v in (classes or {}).items():
        known[k] = (v, None) if isinstance(v, str) else (v[0], v[1])
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    folders = {n: p for n, p in folders.items()
               if any(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())}
    if names is None:
        names = list(folders)
        if not names:
            raise UserError(f"dataset folder {str(root)!r} has no subject folders with images")
    missing = [n for n in names if n not in folders]
    if missing:
        raise UserError(f"no image folder for subject(s) {', '.join(missing)} in {str(root)!r}")
    noclass = [n for n in names if n not in known]
    if noclass:
        raise UserError(f"no class word for subject(s) {', '.join(noclass)}: add them to {CLASSES_FILE} "
                        "or pass --class NAME=CLASS")
    subjects = []
    for n in names:
        word, live = known[n]
        if live is None:
            live = word.lower() in LIVE_CLASSES
        subjects.append(Subject(n, word, bool(live), folders[n]))
    return subjects, templates


# -- atomic JSON ---------------------------------------------------------------------------------

def _jsonable(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# -- summary and the Table 1 format ----------------------------------------------------------------

def _stats(values: Sequence[float | None]) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def summarize(results: Sequence[Mapping], method: str = "zo-edge") -> dict:
    """Aggregate per-subject results (each with ``subject``, ``kind`` and ``metrics``): mean and
    sample standard deviation (ddof=1) over subjects, for all subjects and per kind."""
    def agg(rows):
        return {m: _stats([r["metrics"].get(m) for r in rows]) for m in METRICS}

    out = {"method": method, "n_subjects": len(results), "overall": agg(results)}
    for kind in ("live", "object"):
        rows = [r for r in results if r.get("kind") == kind]
        if rows:
            out[kind] = {"n_subjects": len(rows), **agg(rows)}
    out["subjects"] = [{"subject": r["subject"], "kind": r.get("kind"),
                        **{m: r["metrics"].get(m) for m in METRICS}} for r in results]
    return out


def _cell(st: Mapping | None, digits: int, with_std: bool) -> str:
    if not st or st.get("mean") is None:
        return "-"
    s = f"{st['mean']:.{digits}f}"
    if with_std:
        s += f" ± {st['std']:.{digits}f}"
    return s


def format_table(summaries: Mapping | Sequence[Mapping], subset: str = "overall", digits: int = 3,
                 with_std: bool = True, per_subject: bool = False) -> str:
    """A Markdown table in the paper's Table 1 format: one row per method, columns CLIP-I, CLIP-T,
    DINO, DINO-inter, each "mean ± std" over subjects. ``subset``: overall | live | object.
    ``per_subject`` appends one row per subject of each method."""
    if isinstance(summaries, Mapping):
        summaries = [summaries]
    head = "| Method | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for s in summaries:
        block = s.get(subset) or {}
        lines.append(f"| {s.get('method', '?')} | " + " | ".join(_cell(block.get(m), digits, with_std)
                                                              for m in METRICS) + " |")
        if per_subject:
            for r in s.get("subjects", []):
                cells = [("-" if r.get(m) is None else f"{r[m]:.{digits}f}") for m in METRICS]
                lines.append(f"| {s.get('method', '?')} / {r['subject']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the driver ----------------------------------------------------------------------------------

def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def run_dreambooth(subjects: Sequence[Subject | str] | None, dataset_dir: str | Path | None, out_dir: str | Path,
                   personalize_fn: Callable[[Subject, str, Path], Any],
                   generate_fn: Callable[[Subject, Any, list[str], int, Path], Any],
                   evaluate_fn: Callable[..., Mapping],
                   images_per_prompt: int = 5, *, method: str = "zo-edge",
                   classes: Mapping[str, Any] | None = None, placeholder: str = "<{name}>",
                   include_class_word: bool = True, keep_going: bool = False,
                   log: Callable[[str], None] = _stderr) -> dict:
    """Run the DreamBooth protocol subject by subject, resumably; returns the summary.

    ``subjects``: Subject objects, subject folder names, or None for every subject of
    ``dataset_dir`` (names are resolved with :func:`load_subjects`, which reads
    ``prompts_and_classes.txt`` and ``classes``). ``placeholder`` is a format string over the
    subject's ``name`` and ``class_word``.

    For each subject not already done:

    1. ``learned = personalize_fn(subject, placeholder, work_dir)``
    2. ``generate_fn(subject, learned, prompts, images_per_prompt, generated_dir)`` - writes
       ``images_per_prompt`` images per prompt into ``generated_dir`` (PNG text "prompt" metadata,
       or names ``{prompt_index:03d}_{k}.png``), emptied first;
    3. ``scores = evaluate_fn(subject.folder, generated_dir, prompts_file, placeholder=...,
       class_word=...)`` - e.g. ``functools.partial(zo_edge.eval.metrics.evaluate, metrics_dir)``;
       must give ``clip_i``, ``clip_t``, ``dino``, ``dino_inter``.
    4. ``<subject>/result.json`` is written atomically, and the summary re-written.

    A failing subject raises, unless ``keep_going``: then it is logged, listed under ``failed``
    and retried on the next run.
    """
    if int(images_per_prompt) < 1:
        raise UserError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    out = Path(out_dir)
    templates: dict[str, list[str]] = {}
    if subjects is None or any(isinstance(s, str) for s in subjects):
        if dataset_dir is None:
            raise UserError("subjects given by name need the dataset folder")
        names = None if subjects is None else [s for s in subjects if isinstance(s, str)]
        loaded, templates = load_subjects(dataset_dir, classes, names)
        by_name = {s.name: s for s in loaded}
        subjects = loaded if subjects is None else [by_name[s] if isinstance(s, str) else s for s in subjects]
    elif dataset_dir is not None:
        for cand in (Path(dataset_dir) / CLASSES_FILE, Path(dataset_dir).parent / CLASSES_FILE):
            if cand.is_file():
                templates = parse_prompts_and_classes(cand)[1]
                break
    if not subjects:
        raise UserError("no subjects to run")
    nofolder = [s.name for s in subjects if s.folder is None or not Path(s.folder).is_dir()]
    if nofolder:
        raise UserError(f"no image folder for subject(s) {', '.join(nofolder)}")
    dup = {s.name for s in subjects if sum(t.name == s.name for t in subjects) > 1}
    if dup:
        raise UserError(f"subject(s) listed twice: {', '.join(sorted(dup))}")
    out.mkdir(parents=True, exist_ok=True)

    results: list[dict] = []
    failed: list[dict] = []

    def write_summary():
        summary = summarize(results, method)
        summary["failed"] = failed
        summary["images_per_prompt"] = int(images_per_prompt)
        write_json(out / "summary.json", summary, default=_jsonable)
        write_text(out / "summary.md", format_table(summary) + "\n\n" +
                          format_table(summary, per_subject=True, with_std=False) + "\n")
        return summary

    for i, subj in enumerate(subjects):
        ph = placeholder.format(name=subj.name, class_word=subj.class_word)
        prompts = subject_prompts(subj, ph, include_class_word, templates)
        sdir = out / subj.name
        result_path = sdir / RESULT
        key = {"method": method, "images_per_prompt": int(images_per_prompt), "placeholder": ph,
               "prompts_sha256": _prompts_hash(prompts)}
        prev = _read_json(result_path) if result_path.is_file() else None
        if isinstance(prev, dict) and prev.get("status") == "done" and all(prev.get(k) == v for k, v in key.items()):
            log(f"[{i + 1}/{len(subjects)}] {subj.name}: done already, skipped")
            results.append(prev)
            continue
        log(f"[{i + 1}/{len(subjects)}] {subj.name} ({subj.kind}, class {subj.class_word!r}, placeholder {ph})")
        try:
            sdir.mkdir(parents=True, exist_ok=True)
            prompts_file = sdir / "prompts.txt"
            write_text(prompts_file, "\n".join(prompts) + "\n")
            work = sdir / "personalize"
            work.mkdir(exist_ok=True)
            gen = sdir / "generated"
            seconds = {}
            t0 = time.perf_counter()
            learned = personalize_fn(subj, ph, work)
            seconds["personalize"] = time.perf_counter() - t0
            if gen.exists():
                shutil.rmtree(gen)  # a half-generated set from an interrupted run
            gen.mkdir()
            t0 = time.perf_counter()
            generate_fn(subj, learned, list(prompts), int(images_per_prompt), gen)
            seconds["generate"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = dict(evaluate_fn(subj.folder, gen, prompts_file, placeholder=ph, class_word=subj.class_word))
            seconds["evaluate"] = time.perf_counter() - t0
            missing = [m for m in METRICS if m not in scores]
            if missing:
                raise ValueError(f"evaluate_fn gave no {', '.join(missing)}")
        except Exception as e:
            if not keep_going:
                raise
            log(f"[{i + 1}/{len(subjects)}] {subj.name}: FAILED: {type(e).__name__}: {e}")
            failed.append({"subject": subj.name, "error": f"{type(e).__name__}: {e}"})
            continue
        rec = {"status": "done", "subject": subj.name, "class_word": subj.class_word, "kind": subj.kind,
               **key, "n_prompts": len(prompts), "metrics": {m: scores.get(m) for m in METRICS},
               "seconds": seconds, "evaluation": scores}
        write_json(result_path, rec, default=_jsonable)
        rec = _read_json(result_path)  # what a resumed run will see (plain JSON types)
        results.append(rec)
        write_summary()
        log(f"[{i + 1}/{len(subjects)}] {subj.name}: " + ", ".join(
            f"{METRIC_NAMES[m]} {rec['metrics'][m]:.3f}" for m in METRICS if rec["metrics"][m] is not None))
    return write_summary()
