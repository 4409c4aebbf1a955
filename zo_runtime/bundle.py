"""Read a zo-edge bundle (see docs/bundle.md): the manifest, its files' checksums, ONNX Runtime
sessions for each graph, and the memory-mapped token-embedding table."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .manifest import (file_problems, inside, listed, read_bundle_manifest, read_manifest,  # noqa: F401 (re-exported)
                       sha256_file, verify_files)

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
        root = Path(path).expanduser()
        manifest = read_bundle_manifest(root)
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
        """The token-embedding table, float32 [vocab, dim], memory-mapped read-only."""
        if self._table is None:
            path = listed(self.root, self.manifest, self.manifest["token_embedding"]["path"], "token_embedding")
            try:
                table = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read the token table {path}: {e}") from None
            if table.ndim != 2 or table.shape[1] != self.embedding_dim or not np.issubdtype(table.dtype, np.floating):
                raise UserError(f"the token table {path} has shape {list(table.shape)} ({table.dtype}); the "
                                f"manifest says embedding_dim {self.embedding_dim}")
            self._table = table
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
