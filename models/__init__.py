"""The embedded ``shapes`` models: their procedural world, training recipes, probe and shipped bundles."""
from pathlib import Path

SHAPES_DIR = Path(__file__).parent / "shapes"
SHAPES_BUNDLE = SHAPES_DIR / "bundle"
# its diffusers folder (fp16 safetensors, compute in float32), rebuilt from the bundle's graphs by
# convert/rebuild_source.py: the source of the PyTorch backprop TI baseline (bench quality --methods ti)
SHAPES_SOURCE = SHAPES_DIR / "source"
PROBE_PATH = SHAPES_DIR / "probe.onnx"
# shapes-768: the same model with a 768-wide text encoder (SD 1.x's token width), built by
# zo_edge.models.train_shapes768; only its bundle ships (the diffusers source holds the full
# 152 MB token table: rebuild it with the recipe for the TI baseline)
SHAPES768_DIR = Path(__file__).parent / "shapes768"
SHAPES768_BUNDLE = SHAPES768_DIR / "bundle"
BUNDLES = {"shapes": SHAPES_BUNDLE, "shapes-768": SHAPES768_BUNDLE}
SHAPES_MODELS = tuple(BUNDLES)


def resolve_model(name: str | None) -> str:
    """``None`` or ``"shapes"`` -> the bundle shipped inside the package; ``"shapes-768"`` -> its
    768-wide sibling; anything else is a path."""
    if name is None:
        return str(SHAPES_BUNDLE)
    return str(BUNDLES.get(name, name))
