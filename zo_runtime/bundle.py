"""Read a zo-edge bundle (see docs/bundle.md): the manifest, its files' checksums, ONNX Runtime
sessions for each graph, and the memory-mapped token-embedding table."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import UserError
from .manifest import file_problems, inside, listed, read_manifest, sha256_file, verify_files  # noqa: F401 (re-exported)

MANIFEST = "zo-edge.json"
FORMAT_VERSION = 1

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
}


def resolve_provider(name: str) -> list[str]:
    """'cpu' | 'cuda' | 'dml' | ... (or a full ORT provider name) -> the providers list for a session."""
    import onnxruntime as ort

    full = PROVIDERS.get(name.lower(), name)
    available = ort.get_available_providers()
    if full not in available:
        raise UserError(f"execution provider {name!r} ({full}) is not available in this onnxruntime build; "
                        f"available: {', '.join(available)}")
    return [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]


def weight_only_options(opts) -> None:
    """Session options for weight-only INT8 (int8w) graphs. ORT fuses DequantizeLinear -> MatMul into
    MatMulNBits (8-bit) with accuracy_level 4 by default, which quantizes activations on the fly and
    turns the loss into a step function of θ (benchmarks/bench_zo_signal.py): ask for float compute."""
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_INT_FIELDS = ("resolution", "vae_scale_factor", "embedding_dim")


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


def check_manifest(root: Path, m: dict) -> None:
    """The fields the runtime reads, with their types, and every path it opens: inside the bundle
    and listed in ``files``. One UserError line for the first problem."""
    where = f"{root / MANIFEST}"
    for key in _INT_FIELDS:
        v = m.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    if not isinstance(m.get("vae_scaling_factor"), (int, float)) or isinstance(m["vae_scaling_factor"], bool):
        raise UserError(f"{where}: 'vae_scaling_factor' must be a number, got {m.get('vae_scaling_factor')!r}")
    ns = m.get("noise_schedule")
    steps = ns.get("num_train_timesteps") if isinstance(ns, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise UserError(f"{where}: 'noise_schedule' needs an integer 'num_train_timesteps'")
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or not all(isinstance(g, dict) for g in graphs.values()):
        raise UserError(f"{where}: 'graphs' must map graph names to entries")
    for name, g in graphs.items():
        listed(root, m, g.get("path"), f"{where}: graph {name} path")
        if "external_data" in g:
            listed(root, m, g["external_data"], f"{where}: graph {name} external_data")
        if not isinstance(g.get("inputs"), list) or not all(isinstance(i, dict) and "name" in i for i in g["inputs"]):
            raise UserError(f"{where}: graph {name} has no valid 'inputs' list")
    emb = m.get("token_embedding")
    listed(root, m, emb.get("path") if isinstance(emb, dict) else None, f"{where}: token_embedding path")
    if isinstance(emb, dict) and "fill" in emb:
        check_fill(root, m, emb, where)
    listed(root, m, m.get("scheduler_config"), f"{where}: scheduler_config")
    tok = inside(root, m.get("tokenizer", "tokenizer"), f"{where}: tokenizer folder")
    for fname in TOKENIZER_FILES:
        if (tok / fname).exists() or fname in ("vocab.json", "merges.txt"):
            listed(root, m, (PurePosixPath(m.get("tokenizer", "tokenizer")) / fname).as_posix(),
                   f"{where}: tokenizer file")


TOKEN_FILL_FILE = "zo_edge_token_fill.json"  # in a diffusers text_encoder folder: how its untrained rows were made
FILL_GENERATORS = ("seeded_rows",)


def check_fill(root: Path, m: dict, emb: dict, where: str) -> None:
    """A trimmed token table: ``path`` holds the stored rows [K, D], ``ids`` their token ids [K],
    ``fill`` the generator of every other row, ``shape`` the full table's [vocab, D]."""
    fill, shape = emb["fill"], emb.get("shape")
    if not isinstance(fill, dict) or fill.get("generator") not in FILL_GENERATORS:
        raise UserError(f"{where}: token_embedding.fill needs a 'generator' in {', '.join(FILL_GENERATORS)}")
    seed, std = fill.get("seed"), fill.get("std")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"{where}: token_embedding.fill.seed must be a non-negative integer, got {seed!r}")
    if not isinstance(std, (int, float)) or isinstance(std, bool) or not 0 < std < 1e3:
        raise UserError(f"{where}: token_embedding.fill.std must be a positive number, got {std!r}")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24 for v in shape)):
        raise UserError(f"{where}: a trimmed token_embedding needs 'shape' [vocab, dim], got {shape!r}")
    listed(root, m, emb.get("ids"), f"{where}: token_embedding ids")


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
    _sessions: dict = field(default_factory=dict, repr=False)
    _table: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", verify: bool = True, threads: int = 0) -> "Bundle":
        root = Path(path)
        manifest = read_manifest(root, MANIFEST, "zo-edge-bundle", "model bundle", "run `zo-edge convert` first")
        check_manifest(root, manifest)
        resolve_provider(provider)
        b = cls(root=root, manifest=manifest, provider=provider, threads=threads)
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

    def session(self, name: str):
        """An onnxruntime InferenceSession for graph ``name`` (opened once, then cached)."""
        if name not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            threads = self.threads or int(os.environ.get("ZO_EDGE_THREADS", "0") or 0)
            if threads:
                opts.intra_op_num_threads = threads
            if self.graph(name).get("precision") == "int8w":
                weight_only_options(opts)
            path = listed(self.root, self.manifest, self.graph(name)["path"], f"graph {name} path")
            providers = resolve_provider(self.provider)
            try:
                self._sessions[name] = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # noqa: BLE001 (onnxruntime raises its own Fail / InvalidGraph / ...)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"onnxruntime cannot load the {name} graph {path}: {first}") from None
        return self._sessions[name]

    def release(self, name: str) -> None:
        """Drop a session so its weights and arena leave memory (e.g. the VAE encoder before training)."""
        self._sessions.pop(name, None)

    def timestep_feed(self, t: float, batch: int) -> np.ndarray:
        """The UNet ``timestep`` input as the graph wants it: a float scalar or an int64/float vector [batch].
        ``t`` goes in as given: Euler-type schedulers step through fractional timesteps, which a float graph
        takes exactly (an int64 graph truncates them, as diffusers' own int64 timestep casts do)."""
        spec = self.input_spec("unet", "timestep") or {"dtype": "float32", "rank": 0}
        dtype = np.dtype(spec["dtype"])
        if spec["rank"] == 0:
            return np.asarray(t, dtype=dtype)
        return np.full((batch,), t, dtype=dtype)
