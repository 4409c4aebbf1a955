"""zo_edge.convert: diffusers Stable Diffusion folder -> zo-edge bundle (docs/bundle.md).

    from zo_edge.convert import convert_pipeline
    manifest = convert_pipeline("sd15/", "sd15.zo", weights="int8")

Heavy imports (torch, optimum, onnxruntime.quantization) happen only when a function is used.
"""
from __future__ import annotations

__all__ = ["convert_pipeline", "inspect_source", "read_manifest", "verify_files"]


def __getattr__(name):
    if name == "convert_pipeline":
        from .pipeline import convert_pipeline
        return convert_pipeline
    if name == "inspect_source":
        from .source import inspect_source
        return inspect_source
    if name == "read_manifest":  # the runtime's reader: one reader for every manifest
        from zo_runtime.manifest import read_bundle_manifest
        return read_bundle_manifest
    if name == "verify_files":
        from .manifest import verify_files
        return verify_files
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
