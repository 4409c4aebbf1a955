"""Read a zo-edge bundle (see docs/bundle.md): the manifest, its files' checksums, ONNX Runtime
sessions for each graph, and the memory-mapped token-embedding table."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import providers as _providers
from .errors import UserError
from .manifest import (file_problems, inside, listed, read_bundle_manifest, read_manifest,  # noqa: F401 (re-exported)
                       sha256_file, verify_files)

PROVIDERS = {**_providers.BUILTIN, "qnn": _providers.QNN_EP}


def resolve_provider(name: str) -> list:
    """'cpu' | 'cuda' | 'dml' | ... (or a full ORT provider name) -> the providers list for a session of a
    built-in provider (plugin providers such as qnn are set up on the SessionOptions: zo_runtime.providers)."""
    import onnxruntime as ort

    spec = _providers.check(name)
    if spec.name == "qnn":
        raise UserError("--provider qnn runs zo-edge bundles only (its device is chosen per session)")
    return _providers.configure(spec, ort.SessionOptions())


M_MMAP_THRESHOLD = -3      # glibc mallopt parameter
LOW_MEMORY_MMAP_BYTES = 128 * 1024


def release_large_buffers() -> bool:
    """Ask glibc to serve every allocation of 128 KiB or more with its own mmap, returned to the system on
    free. By default glibc raises that threshold as large blocks are freed (up to 32 MiB) and then keeps
    them in its heap, where one UNet call's buffers fragment it: with onnxruntime's arena off, personalize
    at 512 px peaked 528 MB higher than with it (docs/results/bench_personalize_no_arena.json). Process-wide;
    False where the C library is not glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LOW_MEMORY_MMAP_BYTES))
    except (OSError, AttributeError):
        return False


# weight-only precisions (float activations, the zeroth-order recipe) and their weight bits
WEIGHT_ONLY_BITS = {"int8w": 8, "int4w": 4}


def weight_only_options(opts) -> None:
    """Session options for weight-only (int8w, int4w) graphs. ORT fuses DequantizeLinear -> MatMul into
    MatMulNBits (8- or 4-bit) with accuracy_level 4 by default, which quantizes activations on the fly and
    turns the loss into a step function of θ (benchmarks/bench_zo_signal.py): ask for float compute."""
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")


def seeded_rows(seed: int, rows: int, dim: int, std: float, start: int = 0) -> np.ndarray:
    """Rows ``start .. start+rows`` of a random token table, float32 [rows, dim], bit-exact on every platform.

    Each value is an Irwin-Hall sum of four 16-bit uniforms taken from one 64-bit PCG64 word
    (``random_raw``: a stream NumPy keeps stable), centred and scaled to ``std``: nearly normal
    (bounded at 3.46 std), computed with integer and exactly rounded float64 arithmetic only, so
    a bundle may store the trained rows of a table and regenerate the others at load time.
    """
    gen = np.random.PCG64(seed)
    if start:
        gen.advance(start * dim)
    mean, sd = 2.0 * 65535, float(np.sqrt(4 * (65536.0 ** 2 - 1) / 12))
    out = np.empty((rows, dim), np.float32)
    chunk = max(1, (1 << 20) // max(dim, 1))
    for i in range(0, rows, chunk):
        n = min(chunk, rows - i)
        w = gen.random_raw(n * dim).astype("<u8", copy=False).view("<u2").reshape(-1, 4)
        s = w.sum(axis=1, dtype=np.int64).astype(np.float64)
        out[i:i + n] = ((s - mean) * (std / sd)).reshape(n, dim)
    return out


TOKEN_FILL_FILE = "zo_edge_token_fill.json"  # in a diffusers text_encoder folder: how its untrained rows were made
VOCABULARY_FILE = "zo_edge_vocabulary.json"  # in a diffusers text_encoder folder: {"ids": the rows it was trained on}


def vocabulary_problem(ids, vocab: int) -> str | None:
    """What is wrong with a declared vocabulary (``token_embedding.vocabulary_ids``, or the ``ids`` of
    a source's VOCABULARY_FILE), or None: it must list at least 2 distinct int token ids below ``vocab``."""
    if (not isinstance(ids, list) or len(ids) < 2 or not all(type(i) is int and 0 <= i < vocab for i in ids)
            or len(set(ids)) != len(ids)):
        return f"must list at least 2 distinct token ids below {vocab}"
    return None


def fill_table(rows: np.ndarray, ids: np.ndarray, fill: dict, shape: list[int]) -> np.ndarray:
    """The full token table: ``fill``'s generated rows with ``rows`` written at ``ids``."""
    table = seeded_rows(int(fill["seed"]), shape[0], shape[1], float(fill["std"]))
    table[ids] = rows
    return table


def trim_table(table: np.ndarray, fill: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, rows) of the rows of ``table`` that differ from ``fill``'s generated ones (bit for bit)."""
    table = np.asarray(table, np.float32)
    gen = seeded_rows(int(fill["seed"]), table.shape[0], table.shape[1], float(fill["std"]))
    ids = np.flatnonzero((gen.view(np.uint32) != table.view(np.uint32)).any(axis=1)).astype(np.int64)
    return ids, np.ascontiguousarray(table[ids])


@dataclass
class Bundle:
    """A converted model. ``Bundle.load(path)`` reads and checks the manifest; sessions are opened
    on demand with :meth:`session` and released with :meth:`release`."""

    root: Path
    manifest: dict
    provider: str = "cpu"
    threads: int = 0
    low_memory: bool = False   # no CPU memory arena, large buffers unmapped on free (release_large_buffers)
    _sessions: dict = field(default_factory=dict, repr=False)
    _table: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", verify: bool = True, threads: int = 0,
             low_memory: bool = False) -> "Bundle":
        root = Path(path).expanduser()
        manifest = read_bundle_manifest(root)
        _providers.check(provider, manifest)
        b = cls(root=root, manifest=manifest, provider=provider, threads=threads, low_memory=low_memory)
        if low_memory:
            release_large_buffers()
        if verify:
            b.verify()
        return b

    def verify(self) -> None:
        """Check every file listed in the manifest exists with its recorded size and sha256."""
        verify_files(self.root, self.manifest.get("files", {}), "bundle", "convert it again")

    # -- manifest accessors -------------------------------------------------------------
    def __getitem__(self, key):
        return self.manifest[key]

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def prediction_type(self) -> str:
        return self.manifest.get("prediction_type", "epsilon")

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def vae_scale_factor(self) -> int:
        return int(self.manifest["vae_scale_factor"])

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["vae_scaling_factor"])

    @property
    def latent_channels(self) -> int:
        return int(self.manifest.get("latent_channels", 4))

    @property
    def noise_schedule(self) -> dict:
        return dict(self.manifest["noise_schedule"])

    @property
    def scheduler_config(self) -> dict:
        path = listed(self.root, self.manifest, self.manifest["scheduler_config"], "scheduler_config")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read the scheduler config {path}: {e}") from None
        if not isinstance(config, dict):
            raise UserError(f"{path} is not a JSON object")
        return config

    @property
    def tokenizer_dir(self) -> Path:
        return inside(self.root, self.manifest.get("tokenizer", "tokenizer"), "tokenizer folder")

    def graph(self, name: str) -> dict:
        try:
            return self.manifest["graphs"][name]
        except KeyError:
            raise UserError(f"bundle {self.root} has no {name} graph") from None

    def input_spec(self, graph: str, name: str) -> dict | None:
        for spec in self.graph(graph)["inputs"]:
            if spec["name"] == name:
                return spec
        return None

    # -- run time -------------------------------------------------------------------------
    @property
    def token_table(self) -> np.ndarray:
        """The token-embedding table, float32 [vocab, dim], read-only: memory-mapped, or for a trimmed
        table (``token_embedding.fill``) its stored rows written over the regenerated ones."""
        if self._table is None:
            emb = self.manifest["token_embedding"]
            path = listed(self.root, self.manifest, emb["path"], "token_embedding")
            table = self._load_npy(path, "token table")
            if table.ndim != 2 or table.shape[1] != self.embedding_dim or not np.issubdtype(table.dtype, np.floating):
                raise UserError(f"the token table {path} has shape {list(table.shape)} ({table.dtype}); the "
                                f"manifest says embedding_dim {self.embedding_dim}")
            if "fill" in emb:
                table = self._filled(emb, table, path)
            self._table = table
        return self._table

    @property
    def vocabulary_ids(self) -> np.ndarray | None:
        """The token ids the model was trained on, int64, sorted; ``None`` when the bundle does not say
        (then every row of the table counts, as for a released CLIP). From ``token_embedding.vocabulary_ids``,
        else a trimmed table's stored ``ids`` (docs/bundle.md)."""
        emb = self.manifest["token_embedding"]
        if "vocabulary_ids" in emb:
            ids = emb["vocabulary_ids"]
            problem = vocabulary_problem(ids, len(self.token_table))
            if problem:
                raise UserError(f"bundle {self.root}: token_embedding.vocabulary_ids {problem}")
            return np.array(sorted(ids), np.int64)
        if "fill" in emb:
            self.token_table  # validates the ids against the stored rows
            return np.sort(np.asarray(self._load_npy(listed(self.root, self.manifest, emb["ids"], "token_embedding ids"),
                                                     "token ids"), np.int64))
        return None

    @staticmethod
    def _load_npy(path: Path, what: str) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the {what} {path}: {e}") from None

    def _filled(self, emb: dict, rows: np.ndarray, path: Path) -> np.ndarray:
        vocab, dim = emb["shape"]
        ids_path = listed(self.root, self.manifest, emb["ids"], "token_embedding ids")
        ids = self._load_npy(ids_path, "token ids")
        if dim != self.embedding_dim:
            raise UserError(f"token_embedding.shape {emb['shape']} disagrees with embedding_dim {self.embedding_dim}")
        if ids.ndim != 1 or len(ids) != len(rows) or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"the token ids {ids_path} ({list(ids.shape)}, {ids.dtype}) do not match the "
                            f"{len(rows)} stored rows of {path}")
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab or len(np.unique(ids)) != len(ids)):
            raise UserError(f"the token ids {ids_path} must be distinct ids below the vocabulary size {vocab}")
        table = fill_table(np.asarray(rows, np.float32), ids, emb["fill"], [vocab, dim])
        table.flags.writeable = False
        return table

    def session_options(self, name: str):
        """The onnxruntime SessionOptions graph ``name`` opens with: the one place that sets threads,
        logging, the int8w compute precision and the memory settings of every session."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # No memory pattern: measured on the SD1.5-shaped int8w bundle (benchmarks/profile_personalize.py,
        # docs/results/profile_sd15.json), personalize peaks 267 MB lower at 256 px and 269 MB lower at 512 px
        # (-14 %), the UNet within 1 % of the time (paired runs), outputs bit-identical. The arena stays on:
        # turning both off cost 5-9 % of the UNet's time.
        opts.enable_mem_pattern = False
        # --low-memory: ORT's CPU arena keeps freed blocks for reuse; without it (and with large buffers
        # unmapped on free, Bundle.load), memory goes back to the system. Same arithmetic, slower
        # (docs/results/bench_personalize_lowmem.json).
        if self.low_memory:
            opts.enable_cpu_mem_arena = False
        threads = self.threads or int(os.environ.get("ZO_EDGE_THREADS", "0") or 0)
        if threads:
            opts.intra_op_num_threads = threads
        if self.graph(name).get("precision") in WEIGHT_ONLY_BITS:
            weight_only_options(opts)
        return opts

    def session(self, name: str):
        """An onnxruntime InferenceSession for graph ``name`` (opened once, then cached)."""
        if name not in self._sessions:
            import onnxruntime as ort

            opts = self.session_options(name)
            path = listed(self.root, self.manifest, self.graph(name)["path"], f"graph {name} path")
            spec = _providers.parse(self.provider)
            providers = _providers.configure(spec, opts, self.graph(name).get("precision"))
            try:
                if providers is None:  # a plugin provider, attached to opts
                    sess = ort.InferenceSession(str(path), sess_options=opts)
                else:
                    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # noqa: BLE001 (onnxruntime raises its own Fail / InvalidGraph / ...)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                where = "" if spec.name == "cpu" else f" on --provider {spec.name} (every node must run there)"
                raise UserError(f"onnxruntime cannot load the {name} graph {path}{where}: {first}") from None
            batch = fixed_batch(self.graph(name))
            self._sessions[name] = FixedBatchSession(sess, batch, name) if batch else sess
        return self._sessions[name]

    @property
    def target(self) -> str:
        """What the bundle was converted for: cpu, portable or qnn (convert --target)."""
        return _providers.bundle_target(self.manifest)

    def release(self, name: str) -> None:
        """Drop a session so its weights and arena leave memory (e.g. the VAE encoder before training)."""
        self._sessions.pop(name, None)

    def timestep_feed(self, t: float, batch: int) -> np.ndarray:
        """The UNet ``timestep`` input as this bundle's graph wants it (:func:`timestep_feed`)."""
        return timestep_feed(self.graph("unet")["inputs"], t, batch)


def timestep_feed(inputs: list[dict], t: float, batch: int) -> np.ndarray:
    """The UNet ``timestep`` input as the graph declares it in ``inputs`` (its input specs, as the
    manifest and ``zo_edge.convert.graphs.io_spec`` list them): a float scalar or an int64 / float
    vector [batch]; a float32 scalar when the graph declares none. ``t`` goes in as given:
    Euler-type schedulers step through fractional timesteps, which a float graph takes exactly (an
    int64 graph truncates them, as diffusers' own int64 timestep casts do)."""
    spec = next((i for i in inputs if i.get("name") == "timestep"), None) or {"dtype": "float32", "rank": 0}
    dtype = np.dtype(spec["dtype"])
    if spec["rank"] == 0:
        return np.asarray(t, dtype=dtype)
    return np.full((batch,), t, dtype=dtype)


def fixed_batch(entry: dict) -> int | None:
    """The batch a graph was converted with (convert --batch), or None for a dynamic batch."""
    dims = [i.get("shape") for i in entry.get("inputs", []) if i.get("rank", 0) > 0]
    firsts = {d[0] for d in dims if isinstance(d, list) and d}
    if len(firsts) == 1 and isinstance(next(iter(firsts)), int):
        return int(next(iter(firsts)))
    return None


class FixedBatchSession:
    """A session over a graph of fixed batch ``batch``: ``run`` splits the feeds into chunks of that
    batch (the last one padded with copies of its last row), runs each, and joins the outputs, so a
    caller can pass any batch. Inputs of rank 0 (the UNet's timestep) go to every chunk unchanged.
    Any other shape that differs from the graph's is one UserError line."""

    def __init__(self, session, batch: int, graph: str):
        self.session, self.batch, self.graph = session, batch, graph
        self.shapes = {i.name: i.shape for i in session.get_inputs()}

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, output_names, feeds, run_options=None):
        rows = None
        for k, v in feeds.items():
            want = self.shapes.get(k)
            if want is None or not want:
                continue
            v = np.asarray(v)
            if v.ndim != len(want) or any(isinstance(d, int) and d != n for d, n in zip(want[1:], v.shape[1:])):
                raise UserError(f"this bundle has fixed shapes: {self.graph} input {k} is {list(want)}, got "
                                f"{list(v.shape)} (convert the model again for this size)")
            if rows is not None and len(v) != rows:
                raise UserError(f"{self.graph}: inputs disagree on the batch ({rows} vs {len(v)})")
            rows = len(v)
        if rows is None or rows == self.batch:
            return self.session.run(output_names, feeds, run_options)
        outs = []
        for start in range(0, rows, self.batch):
            chunk = {}
            for k, v in feeds.items():
                if self.shapes.get(k):
                    part = np.asarray(v)[start:start + self.batch]
                    if len(part) < self.batch:
                        part = np.concatenate([part, np.repeat(part[-1:], self.batch - len(part), axis=0)])
                    chunk[k] = part
                else:
                    chunk[k] = v
            got = self.session.run(output_names, chunk, run_options)
            outs.append([o[:min(self.batch, rows - start)] for o in got])
        return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
