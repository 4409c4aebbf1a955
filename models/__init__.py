"""The embedded ``shapes`` model: its procedural world, training recipe, probe and shipped bundle."""
from pathlib import Path

SHAPES_DIR = Path(__file__).parent / "shapes"
SHAPES_BUNDLE = SHAPES_DIR / "bundle"
# its diffusers folder (fp16 safetensors, compute in float32), rebuilt from the bundle's graphs by
# convert/rebuild_source.py: the source of the PyTorch backprop TI baseline (bench quality --methods ti)
SHAPES_SOURCE = SHAPES_DIR / "source"
PROBE_PATH = SHAPES_DIR / "probe.onnx"


def resolve_model(name: str | None) -> str:
    """``None`` or ``"shapes"`` -> the bundle shipped inside the package; anything else is a path."""
    if name in (None, "shapes"):
        return str(SHAPES_BUNDLE)
    return name
