"""Small ONNX helpers shared by the converter: saving (external data past 2 GB), reading a graph's
interface, pruning dead nodes, and ONNX Runtime sessions.

Large graphs are processed with their weights left on disk: :func:`load_lazy` reads the graph without
its external data, :func:`tensor_array` reads one initializer when a step needs its values, and
:func:`save_model` streams the weights tensor by tensor into the new data file. A 3.4 GB SD1.5 UNet
is never whole in memory, which is what kept conversion's fusion stage at 20 GB.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

# protobuf cannot serialize a message over 2 GiB; leave headroom for the graph itself
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
DATA_SUFFIX = "_data"  # model.onnx -> model.onnx_data, the name Optimum uses too


def initializer_bytes(model: onnx.ModelProto) -> int:
    n = 0
    for t in model.graph.initializer:
        try:
            item = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:  # noqa: BLE001 (exotic dtype: count raw bytes)
            item = 1
        n += int(np.prod(t.dims, dtype=np.int64)) * item if t.dims else item
    return n


def needs_external_data(model: onnx.ModelProto) -> bool:
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD


# A weight-only graph whose weights pass this size is saved with its weights in an external data file:
# onnxruntime then maps them from disk instead of copying them into the process. Measured on the
# SD1.5-shaped int8w UNet (benchmarks/profile_personalize.py, configuration external-unet): personalize
# peaks 102-136 MB lower and holds 0.73 GB less private memory, losses bit-identical, the UNet alone as fast
# (0.98-1.04x paired), a whole iteration 1.02-1.15x (single runs; README, "On an Intel Xeon"). The mapped
# pages are the page cache's: shared between processes, dropped and re-read under memory pressure.
MAPPED_WEIGHTS_THRESHOLD = 32 * 2 ** 20


def maps_weights(model: onnx.ModelProto) -> bool:
    """Whether a weight-only graph is saved with external data (see MAPPED_WEIGHTS_THRESHOLD)."""
    return initializer_bytes(model) >= MAPPED_WEIGHTS_THRESHOLD


@contextlib.contextmanager
def working_directory(path: str | Path):
    """Run the block in ``path``: onnxruntime's graph tools and ONNX's checker resolve a lazily loaded
    graph's external data from the working directory."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def load_lazy(path: str | Path) -> onnx.ModelProto:
    """The graph at ``path`` with its external weights left on disk (read them with
    :func:`tensor_array`, save with ``save_model(..., base_dir=path.parent)``)."""
    return onnx.load(str(path), load_external_data=False)


def tensor_array(t: onnx.TensorProto, base_dir: str | Path | None = None) -> np.ndarray:
    """The values of initializer ``t``, read from its external data file under ``base_dir`` if it has one."""
    return numpy_helper.to_array(t, base_dir=str(base_dir) if base_dir is not None else "")


def has_external_refs(model: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in _all_tensors(model))


def save_model(model: onnx.ModelProto, path: str | Path, external: bool | None = None,
               base_dir: str | Path | None = None) -> list[Path]:
    """Save ``model`` to ``path``; external data (``<name>_data``) when over 2 GB or asked.

    A model from :func:`load_lazy` still points at its weights under ``base_dir``: saved with external
    data, they are copied tensor by tensor into the new data file, never all in memory; saved in one
    file (under 2 GB), they are read in first. Returns the files written (the .onnx first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + DATA_SUFFIX)
    if external is None:
        external = needs_external_data(model)
    if has_external_refs(model):
        if base_dir is None:
            raise ValueError("save_model: the model's weights are on disk; pass base_dir, the folder they are in")
        if external:
            _stream_external(model, data, Path(base_dir))
            onnx.save_model(model, str(path))
            return [path, data]
        for t in _all_tensors(model):
            if uses_external_data(t):
                t.raw_data = _external_bytes(t, Path(base_dir))
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
    if data.exists():
        data.unlink()
    if external:  # our own writer: onnx's (1.23) creates the data file readable by its owner only
        _stream_external(model, data, path.parent)
        onnx.save_model(model, str(path))
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _external_bytes(t: onnx.TensorProto, base_dir: Path) -> bytes:
    info = {e.key: e.value for e in t.external_data}
    f = (base_dir / info["location"]).resolve()
    if base_dir.resolve() not in f.parents:
        raise ValueError(f"tensor {t.name!r}: external data {info['location']!r} lies outside {base_dir}")
    with open(f, "rb") as fh:
        fh.seek(int(info.get("offset", 0)))
        return fh.read(int(info["length"])) if "length" in info else fh.read()


def _stream_external(model: onnx.ModelProto, data: Path, base_dir: Path, size_threshold: int = 1024) -> None:
    """Write every large or already-external initializer of ``model`` into ``data``, one tensor at a time,
    and point the tensors at it. The file is written beside and renamed at the end, so ``data`` may be
    the very file the weights are read from."""
    partial = data.with_name(data.name + ".partial")
    with open(partial, "wb") as out:
        for t in _all_tensors(model):
            if uses_external_data(t):
                raw = _external_bytes(t, base_dir)
            elif t.HasField("raw_data") and len(t.raw_data) >= size_threshold:
                raw = t.raw_data
            elif not t.HasField("raw_data") and t.data_type != onnx.TensorProto.STRING and \
                    int(np.prod(t.dims, dtype=np.int64)) * 4 >= size_threshold:
                raw = numpy_helper.to_array(t).tobytes()
            else:
                continue
            offset = out.tell()
            out.write(raw)
            for field in ("raw_data", *_TYPED_FIELDS):
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
    os.replace(partial, data)


def copy_graph(src: str | Path, dst: str | Path) -> None:
    """Copy an ONNX graph with its external data, normalizing the data file to ``<dst name>_data``:
    a single-file graph is copied byte for byte, one with external data is streamed tensor by tensor."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if len(graph_files(src)) == 1:
        shutil.copyfile(src, dst)
    else:
        save_model(load_lazy(src), dst, external=True, base_dir=src.parent)


def graph_files(path: str | Path) -> list[Path]:
    """The .onnx file and every external-data file it references (relative to its folder)."""
    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    files = [path]
    seen = set()
    for t in _all_tensors(m):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and e.value not in seen:
                    seen.add(e.value)
                    files.append(path.parent / e.value)
    return files


def _all_tensors(m: onnx.ModelProto):
    yield from m.graph.initializer
    for n in m.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def _value_spec(v: onnx.ValueInfoProto) -> dict:
    tt = v.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    except Exception:  # noqa: BLE001
        dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
    shape = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            shape.append(d.dim_param)
        else:
            shape.append(None)
    return {"name": v.name, "dtype": dtype, "rank": len(tt.shape.dim), "shape": shape}


def io_spec(path_or_model) -> dict:
    """``{"inputs": [...], "outputs": [...]}`` read from the graph: name, dtype, rank, shape
    (ints for fixed dims, names for symbolic ones). Initializers listed as inputs are skipped."""
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return {"inputs": [_value_spec(v) for v in m.graph.input if v.name not in inits],
            "outputs": [_value_spec(v) for v in m.graph.output]}


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for a in node.attribute:
        gs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in gs:
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_inputs(n)
    return names


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove nodes whose outputs nobody uses, then unused initializers and graph inputs. In place."""
    g = model.graph
    used = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o and o in used for o in node.output):
            keep.append(node)
            used.update(i for i in node.input if i)
            used |= _subgraph_inputs(node)
    keep.reverse()
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in used]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)
    ins = [v for v in g.input if v.name in used]
    if len(ins) != len(g.input):
        del g.input[:]
        g.input.extend(ins)
    return model


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def session(path: str | Path, threads: int | None = None, provider: str = "cpu"):
    """An ONNX Runtime CPU session with quiet logging."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env and env.isdigit() else 0
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if is_weight_only(path):  # as the runtime runs it
        from zo_runtime.bundle import weight_only_options
        weight_only_options(so)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


WEIGHT_ONLY_KEY = "zo_edge.weight_only"


def is_weight_only(path: str | Path) -> bool:
    """True for graphs written by quantize_weight_only (marked in their metadata)."""
    m = onnx.load(str(path), load_external_data=False)
    return any(p.key == WEIGHT_ONLY_KEY and p.value == "1" for p in m.metadata_props)
