"""Peak RSS of a portable int8w UNet on the OpenVINO provider, per session option set (issue 16).

Run in the onnxruntime-openvino environment, one fresh process per variant:

    for v in default noopt qdq noopt-qdq cache1 cache2; do python benchmarks/lab_openvino_memory.py $v UNET.onnx; done

default: zo-edge's options (precision ACCURACY); noopt: onnxruntime's graph optimizations off; qdq: the
provider's enable_qdq_optimizer; cache1 / cache2: a model cache directory, written then read.
"""
import json
import resource
import sys
import time
import numpy as np
import onnxruntime as ort
variant = sys.argv[1]
path = sys.argv[2] if len(sys.argv) > 2 else "/work/sd15/portable-int8w/unet/model.onnx"
opts = ort.SessionOptions(); opts.log_severity_level = 3; opts.enable_mem_pattern = False
opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
po = {"device_type": "CPU", "precision": "ACCURACY"}
if variant in ("noopt", "noopt-qdq"):
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
if variant.startswith("cache"):
    po["cache_dir"] = str(__import__("pathlib").Path(path).parent / "ov-cache")
if variant in ("qdq", "noopt-qdq"):
    po["enable_qdq_optimizer"] = "True"
t0 = time.time()
s = ort.InferenceSession(path, sess_options=opts, providers=[("OpenVINOExecutionProvider", po)])
load = time.time() - t0
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rng = np.random.default_rng(0)
feed = {"sample": rng.standard_normal((3, 4, 32, 32), dtype=np.float32),
        "timestep": np.asarray(500, dtype=np.int64 if "int64" in s.get_inputs()[1].type else np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 77, 768), dtype=np.float32)}
ts = []
for _ in range(3):
    t0 = time.time(); out = s.run(None, feed)[0]; ts.append(time.time() - t0)
print(json.dumps({"variant": variant, "load_s": load, "load_peak_mb": load_peak,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "run_s": ts}))
