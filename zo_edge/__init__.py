"""zo-edge: forward-only personalization of Stable Diffusion on ONNX Runtime.

The repository's ``cli/``, ``convert/`` and ``models/`` folders install as ``zo_edge.cli``,
``zo_edge.convert`` and ``zo_edge.models``; the embeddable runtime is the top-level ``zo_runtime``.
"""
__version__ = "0.1.0"
