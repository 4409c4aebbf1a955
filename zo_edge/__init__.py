"""zo-edge: forward-only personalization of Stable Diffusion on ONNX Runtime.

The repository's ``cli/``, ``convert/``, ``eval/`` and ``models/`` folders install as ``zo_edge.cli``,
``zo_edge.convert``, ``zo_edge.eval`` and ``zo_edge.models``; the embeddable runtime is the top-level
``zo_runtime`` (docs/architecture.md).
"""
__version__ = "0.1.0"
