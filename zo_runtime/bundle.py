"""Read a zo-edge bundle (see docs/bundle.md): the manifest, its files' checksums, ONNX Runtime
sessions for each graph, and the memory-mapped token-embedding table."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_only_options(opts) -> None:
    """Session options for weight-only INT8 (int8w) graphs. ORT fuses DequantizeLinear -> MatMul into
    MatMulNBits (8-bit) with accuracy_level 4 by default, which quantizes activations on the fly and
    turns the loss into a step function of θ (benchmarks/bench_zo_signal.py): ask for float compute."""
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")


def file_problems(root: Path, files: dict) -> list[str]:
    """files: {relative path: {"sha256": hex, "bytes": n}} -> one line per missing or damaged file."""
    bad = []
    for rel, meta in files.items():
        p = Path(root) / rel
        if not p.is_file():
            bad.append(f"{rel}: missing")
        elif "bytes" in meta and p.stat().st_size != meta["bytes"]:
            bad.append(f"{rel}: {p.stat().st_size} bytes, the manifest says {meta['bytes']}")
        elif sha256_file(p) != meta["sha256"]:
            bad.append(f"{rel}: fails its sha256 check")
    return bad


def verify_files(root: Path, files: dict, what: str, remedy: str) -> None:
    """One UserError line for the first missing or damaged file."""
    bad = file_problems(root, files)
    if bad:
        raise UserError(f"{what} file {bad[0]}: it is damaged or incomplete; {remedy}")


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
        if not root.is_dir():
            raise UserError(f"model bundle {str(root)!r} is not a directory")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise UserError(f"{str(root)!r} is not a zo-edge bundle: {MANIFEST} is missing (run `zo-edge convert` first)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{mpath}: manifest is not valid JSON ({e})") from None
        if manifest.get("format") != "zo-edge-bundle":
            raise UserError(f"{mpath}: not a zo-edge bundle manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise UserError(f"{mpath}: format version {manifest.get('format_version')} is newer than this "
                            f"zo-edge understands ({FORMAT_VERSION}); upgrade zo-edge")
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
        return json.loads((self.root / self.manifest["scheduler_config"]).read_text())

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.manifest.get("tokenizer", "tokenizer")

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
        """The token-embedding table, float32 [vocab, dim], memory-mapped read-only."""
        if self._table is None:
            self._table = np.load(self.root / self.manifest["token_embedding"]["path"], mmap_mode="r")
        return self._table

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
            path = self.root / self.graph(name)["path"]
            self._sessions[name] = ort.InferenceSession(str(path), sess_options=opts,
                                                        providers=resolve_provider(self.provider))
        return self._sessions[name]

    def release(self, name: str) -> None:
        """Drop a session so its weights and arena leave memory (e.g. the VAE encoder before training)."""
        self._sessions.pop(name, None)

    def timestep_feed(self, t: int, batch: int) -> np.ndarray:
        """The UNet ``timestep`` input as the graph wants it: a float scalar or an int64/float vector [batch]."""
        spec = self.input_spec("unet", "timestep") or {"dtype": "float32", "rank": 0}
        dtype = np.dtype(spec["dtype"])
        if spec["rank"] == 0:
            return np.asarray(t, dtype=dtype)
        return np.full((batch,), t, dtype=dtype)
