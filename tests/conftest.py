"""Shared session fixtures: tiny random-weight Stable Diffusion pipelines and bundles made from them.

Public fixtures (other test files use these names):

* ``tiny_sd1_dir``  -- diffusers folder, SD1-style (epsilon, PNDM, quick_gelu CLIP), 16 px images,
  8x8x4 latents, CLIP width 32, the real 49,408-token CLIP tokenizer.
* ``tiny_sd2_dir``  -- the same size, SD2-style (v_prediction, DDIM, gelu CLIP, linear projections).
* ``tiny_bundle_fp32`` / ``tiny_bundle_int8`` -- zo-edge bundles (Path) converted from tiny_sd1_dir.
* ``tiny_sd1_export`` -- the raw Optimum ONNX export of tiny_sd1_dir (Path), exported once.

All are deterministic (torch.manual_seed(0) inside build_pipeline) and built once per session.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    from zo_edge.testing import build_pipeline
    return build_pipeline(tmp_path_factory.mktemp("tiny_sd1") / "pipeline", family="sd1", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    from zo_edge.testing import build_pipeline
    return build_pipeline(tmp_path_factory.mktemp("tiny_sd2") / "pipeline", family="sd2", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_export(tiny_sd1_dir, tmp_path_factory):
    from zo_edge.convert.export import export_onnx
    out = tmp_path_factory.mktemp("tiny_sd1_export") / "onnx"
    export_onnx(tiny_sd1_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_fp32(tiny_sd1_dir, tiny_sd1_export, tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    from zo_edge.models.calibration import SHAPES_WORLD
    out = tmp_path_factory.mktemp("bundles") / "tiny_sd1_fp32"
    convert_pipeline(tiny_sd1_dir, out, weights="fp32", export_dir=tiny_sd1_export, data=SHAPES_WORLD)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_sd1_dir, tiny_sd1_export, tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    from zo_edge.models.calibration import SHAPES_WORLD
    out = tmp_path_factory.mktemp("bundles") / "tiny_sd1_int8"
    convert_pipeline(tiny_sd1_dir, out, weights="int8", export_dir=tiny_sd1_export, data=SHAPES_WORLD)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_int8w(tiny_sd1_dir, tiny_sd1_export, tmp_path_factory):
    from zo_edge.convert import convert_pipeline
    from zo_edge.models.calibration import SHAPES_WORLD
    out = tmp_path_factory.mktemp("bundles") / "tiny_sd1_int8w"
    convert_pipeline(tiny_sd1_dir, out, weights="int8w", export_dir=tiny_sd1_export, data=SHAPES_WORLD)
    return out
