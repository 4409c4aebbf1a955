"""zo_edge.eval: the evaluation harness, kept out of the embeddable runtime.

- :mod:`zo_edge.eval.metrics`: the paper's CLIP-I, CLIP-T, DINO and DINO-inter on ONNX Runtime
  (torch-free: numpy, onnxruntime, pillow and ``zo_runtime``), read from a metrics bundle that
  ``zo-edge convert-metrics`` writes;
- :mod:`zo_edge.eval.dreambooth`: the DreamBooth protocol (subjects, prompt lists, the resumable
  personalize -> generate -> score driver, the Table 1 summary); torch-free;
- :mod:`zo_edge.eval.textual_inversion`: the PyTorch backprop textual-inversion baseline the
  benchmarks compare against (needs the ``convert`` extra: torch, diffusers, transformers).

Nothing here is imported by ``zo_runtime``.
"""
