"""Execution providers: which onnxruntime provider runs a bundle's graphs, and how it is set up.

``--provider NAME[:KEY=VALUE,...]`` (e.g. ``qnn``, ``qnn:backend_path=/opt/qnn/libQnnHtp.so``,
``openvino:precision=ACCURACY``). The options after the colon go to the provider as its options.

* ``cpu``, ``cuda``, ``dml``, ``coreml``, ... : providers built into the installed onnxruntime,
  chosen by name, with the CPU provider behind them.
* ``qnn``: Qualcomm's HTP (NPU) through onnxruntime-qnn (``pip install "zo-edge[qnn]"``), a plugin
  execution provider: its library is registered with ``register_execution_provider_library`` and its
  device is chosen with ``SessionOptions.add_provider_for_devices``, not by a provider name. The
  backend is the package's libQnnHtp unless ``backend_path`` is given (or ZO_EDGE_QNN_BACKEND_PATH
  is set). On x86-64 Linux that backend simulates the HTP (slowly: about 2 s per shapes-UNet
  forward here). Needs a bundle converted with ``--target qnn``; every node must run on HTP (CPU
  fallback disabled), so a graph HTP cannot take fails to load instead of silently running on CPU.
  Graphs the manifest calls ``fp16`` (``--weights fp16``: float graphs) run in HTP's FP16 mode
  (:data:`QNN_FP16_DEFAULTS`).
* ``openvino``: the onnxruntime-openvino build (a separate onnxruntime: install it in its own
  environment instead of onnxruntime). ``precision`` defaults to ACCURACY: its default CPU precision
  hint changes int8w outputs and drops the zeroth-order signal (docs/results/zo_signal.json). Needs
  standard ONNX ops (``--target portable``, or an unfused cpu bundle); CPU fallback disabled.

Everything that can be known before a session is opened is checked by :func:`check`, so a missing
package or an unsuitable bundle is one line before any long work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import UserError

BUILTIN = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
QNN_EP = "QNNExecutionProvider"
QNN_BACKEND_ENV = "ZO_EDGE_QNN_BACKEND_PATH"
OPENVINO_DEFAULTS = {"device_type": "CPU", "precision": "ACCURACY"}
# A --target qnn --weights fp16 bundle's graphs are float: HTP runs them in half precision, which onnxruntime-qnn
# enables only together with a SoC model. 60 is the Snapdragon X Elite (SC8380XP, HTP v73), the laptop NPU this
# is for; on another device pass its own: --provider qnn:soc_model=N.
QNN_FP16_DEFAULTS = {"enable_htp_fp16_precision": "1", "soc_model": "60"}
INSTALL = {
    "qnn": 'pip install "zo-edge[qnn]" (the onnxruntime-qnn package, 2.x)',
    "openvino": "pip install onnxruntime-openvino in its own environment (it replaces the onnxruntime package)",
    "cuda": "pip install onnxruntime-gpu in place of onnxruntime",
    "tensorrt": "pip install onnxruntime-gpu in place of onnxruntime",
    "dml": "pip install onnxruntime-directml in place of onnxruntime (Windows)",
    "directml": "pip install onnxruntime-directml in place of onnxruntime (Windows)",
}
_registered: set[str] = set()


@dataclass(frozen=True)
class ProviderSpec:
    """A parsed ``--provider`` value: the short name (or a full ORT provider name) and its options."""
    name: str
    options: dict = field(default_factory=dict)

    @property
    def backend(self) -> str:
        """What runs the graphs, for messages and results files: cpu, qnn, openvino, ..."""
        return self.name

    @property
    def ort_name(self) -> str:
        return QNN_EP if self.name == "qnn" else BUILTIN.get(self.name, self.name)


def parse(spec: str) -> ProviderSpec:
    """``"qnn:backend_path=/x/libQnnHtp.so,htp_performance_mode=burst"`` -> ProviderSpec."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"--provider must be a name such as cpu, qnn or openvino, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    key = name.lower()
    name = key if key in BUILTIN or key == "qnn" else name
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise UserError(f"--provider option {item!r} is not KEY=VALUE (e.g. qnn:backend_path=/path/libQnnHtp.so)")
        options[k.strip()] = v.strip()
    return ProviderSpec(name, options)


def _missing(spec: ProviderSpec, detail: str) -> UserError:
    how = INSTALL.get(spec.name)
    return UserError(f"execution provider {spec.name!r} is not available here: {detail}"
                     + (f"; install it with: {how}" if how else ""))


def _qnn():
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    return onnxruntime_qnn


def qnn_devices(spec: ProviderSpec):
    """Register onnxruntime-qnn's library (once per process) and return its devices, NPUs first."""
    import onnxruntime as ort

    q = _qnn()
    if q is None:
        raise _missing(spec, "the onnxruntime-qnn package is not installed")
    if not hasattr(ort, "register_execution_provider_library"):
        raise _missing(spec, f"onnxruntime {ort.__version__} cannot load plugin providers (1.22 or newer can)")
    name = q.get_ep_name()
    if name not in _registered:
        try:
            ort.register_execution_provider_library(name, q.get_library_path())
        except Exception as e:  # noqa: BLE001 (Fail when another caller registered it first)
            if "already registered" not in str(e):
                raise _missing(spec, f"registering {q.get_library_path()} failed: {str(e).strip().splitlines()[0]}")
        _registered.add(name)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        raise _missing(spec, "onnxruntime-qnn lists no device on this machine")
    npu = [d for d in devices if str(d.device.type).endswith("NPU")]
    return npu or devices


def qnn_options(spec: ProviderSpec) -> dict:
    q = _qnn()
    opts = dict(spec.options)
    path = opts.get("backend_path") or os.environ.get(QNN_BACKEND_ENV) or (q.get_qnn_htp_path() if q else "")
    if not path or not os.path.isfile(path):
        raise _missing(spec, f"the QNN backend library {path!r} does not exist (set backend_path=... or "
                             f"{QNN_BACKEND_ENV})")
    opts["backend_path"] = path
    return opts


def check(spec: ProviderSpec | str, manifest: dict | None = None) -> ProviderSpec:
    """Is ``spec`` usable here, for this bundle? One UserError line if not. Returns the parsed spec."""
    import onnxruntime as ort

    spec = parse(spec) if isinstance(spec, str) else spec
    target = bundle_target(manifest) if manifest is not None else None
    if spec.name == "qnn":
        qnn_devices(spec)
        qnn_options(spec)
        if manifest is not None and target != "qnn":
            raise UserError(f"--provider qnn needs a bundle converted with --target qnn (fixed shapes; A16W8 "
                            f"or FP16 for the HTP); this one is --target {target}")
        return spec
    full = spec.ort_name
    available = ort.get_available_providers()
    if full not in available:
        raise _missing(spec, f"{full} is not in this onnxruntime build (available: {', '.join(available)})")
    if spec.name == "openvino" and manifest is not None and not standard_ops(manifest):
        raise UserError("--provider openvino needs standard ONNX ops: this bundle uses onnxruntime CPU fusions "
                        "(com.microsoft ops); convert it with --target portable")
    if target == "qnn" and spec.name != "cpu":
        raise UserError(f"a --target qnn bundle runs on --provider qnn (or cpu, to compare); not {spec.name}")
    return spec


def bundle_target(manifest: dict) -> str:
    t = manifest.get("target")
    return t.get("name", "cpu") if isinstance(t, dict) and isinstance(t.get("name"), str) else "cpu"


def standard_ops(manifest: dict) -> bool:
    """Do the bundle's graphs use standard ONNX ops only (as far as the manifest tells)?"""
    if bundle_target(manifest) != "cpu":
        return True
    q = manifest.get("quantization") if isinstance(manifest.get("quantization"), dict) else {}
    unet = (manifest.get("graphs") or {}).get("unet") or {}
    return not q.get("fuse") and not unet.get("fused") and q.get("weights") != "int4"


def configure(spec: ProviderSpec, opts, precision: str | None = None) -> list | None:
    """Set up ``opts`` (SessionOptions) for ``spec``; returns the ``providers`` list for
    InferenceSession, or None when the provider was attached to ``opts`` (plugin providers).
    ``precision``: the graph's, from the bundle's manifest (``fp16`` graphs run in HTP's FP16 mode)."""
    if spec.name == "qnn":
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        # One intra-op thread: with more, the x86 HTP simulator is not deterministic (measured on the shapes
        # UNet: the same input twice differs by 4e-3 in an output of norm 33, more than the differences RGE
        # measures); with one, repeated runs are bit-identical. The NPU itself does not use this pool.
        opts.intra_op_num_threads = 1
        qnn = qnn_options(spec)
        if precision == "fp16":
            qnn = {**QNN_FP16_DEFAULTS, **qnn}
        opts.add_provider_for_devices(qnn_devices(spec), qnn)
        return None
    full = spec.ort_name
    if full == "CPUExecutionProvider":
        return [full]
    if spec.name == "openvino":
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return [(full, {**OPENVINO_DEFAULTS, **spec.options})]
    return [(full, dict(spec.options)) if spec.options else full, "CPUExecutionProvider"]
