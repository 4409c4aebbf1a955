"""zo-edge personalize-many: a jobs file of personalize runs on local processes or Ray, on the shipped
shapes bundle (~30 steps/s on one thread). Finished jobs are skipped, a kill -9 of the batch resumes
bit for bit, a failing job is recorded and isolated, bad input is one line before any work, and the
same jobs give the same tokens locally and on a local Ray instance."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zo_edge import runner
from zo_edge.cli.main import main as cli
from zo_edge.models import SHAPES_BUNDLE, world
from zo_runtime.embeddings import load_embeddings
from zo_runtime.personalize import PersonalizeConfig, Trainer

# One thread, no SG (d = 64 < tau), a checkpoint every 4 steps: a 12-step job takes well under a second.
BASE = dict(init="shape", steps=12, checkpoint_every=4, sg=False, threads=1)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Three reference folders of three held-out subjects, 32 px, three images each."""
    root = tmp_path_factory.mktemp("runner_refs")
    for j, (shape, colour, pattern) in enumerate(world.HELD_OUT[:3]):
        folder = root / f"s{j}"
        folder.mkdir()
        for i, im in enumerate(world.reference_images(world.Subject(shape, colour, pattern), n=3, seed=j, size=32)):
            Image.fromarray(im).save(folder / f"r{i}.png")
    return root


def write_jobs(path: Path, refs: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({**BASE, "images": str(refs / f"s{k % 3}"), "token": f"<s{k}>",
                                        "out": f"out/s{k}.safetensors", **row}) + "\n"
                            for k, row in enumerate(rows)))
    return path


def reference_token(refs: Path, tmp: Path, k: int, **kw) -> np.ndarray:
    """The token one plain personalize run learns for job k of write_jobs."""
    cfg = PersonalizeConfig(**{**BASE, "model": str(SHAPES_BUNDLE), "images": str(refs / f"s{k % 3}"),
                               "token": f"<s{k}>", "out": str(tmp / f"ref{k}.safetensors"),
                               "run_dir": str(tmp / f"ref{k}.run"), **kw})
    return Trainer(cfg).train().theta


def invoke(*args):
    return CliRunner().invoke(cli, ["personalize-many", *map(str, args)])


def manifest(path: Path) -> dict:
    return {Path(r["out"]).name: r for r in json.loads(path.read_text())["jobs"]}


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------

GOOD = '{"images": "i", "token": "<a>", "init": "shape", "out": "a.safetensors"}'


@pytest.mark.parametrize("name,text,needle", [
    ("jobs.jsonl", GOOD + '\n{"images": "i", "token": "<b>" "init": "shape"}\n', "jobs.jsonl:2: not valid JSON"),
    ("jobs.jsonl", GOOD + "\n\n[1, 2]\n", "jobs.jsonl:3: expected a JSON object"),
    ("jobs.jsonl", '{"images": "i", "token": "<a>", "out": "a.safetensors"}\n', "jobs.jsonl:1: missing field 'init'"),
    ("jobs.jsonl", GOOD[:-1] + ', "stepz": 5}\n', "jobs.jsonl:1: unknown field 'stepz'"),
    ("jobs.jsonl", GOOD[:-1] + ', "steps": "many"}\n', "jobs.jsonl:1: field 'steps': expected an integer"),
    ("jobs.jsonl", GOOD[:-1] + ', "steps": 0}\n', "jobs.jsonl:1: --steps must be >= 1"),
    ("jobs.jsonl", GOOD[:-1] + ', "recipe": "fast"}\n', "jobs.jsonl:1: unknown recipe 'fast'"),
    ("jobs.jsonl", GOOD + "\n" + GOOD.replace("<a>", "<b>") + "\n", "jobs.jsonl:2: out "),
    ("jobs.jsonl", GOOD[:-1] + ', "run_dir": "r"}\n' + GOOD.replace("a.s", "b.s")[:-1] + ', "run_dir": "r"}\n',
     "jobs.jsonl:2: run_dir "),
    ("jobs.csv", "images,token,init,out,steps\ni,<a>,shape,a.safetensors,10\ni,<b>,shape,b.safetensors,ten\n",
     "jobs.csv:3: field 'steps': expected an integer, got 'ten'"),
    ("jobs.csv", "images,token,init,out,sg\ni,<a>,shape,a.safetensors,maybe\n",
     "jobs.csv:2: field 'sg': expected true or false"),
    ("jobs.csv", "images,token,init,out\ni,<a>,shape,a.safetensors,extra\n", "jobs.csv:2: more values than the header"),
    ("jobs.txt", GOOD + "\n", "expected a .jsonl or .csv file"),
    ("jobs.jsonl", "\n", "holds no jobs"),
])
def test_bad_jobs_file_is_one_line_before_any_work(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    r = invoke(tmp_path / name)
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("zo-edge: error: ")
    assert needle in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no manifest, no run directory


@pytest.mark.parametrize("address,needle", [("127.0.0.1:1", "cannot reach a Ray cluster at 127.0.0.1:1"),
                                            ("ray://127.0.0.1:1", "cannot reach a Ray cluster"),
                                            ("headnode", "--ray expects auto, HOST:PORT")])
def test_unreachable_ray_address_is_one_line(tmp_path, address, needle):
    (tmp_path / "jobs.jsonl").write_text(GOOD + "\n")
    t0 = time.time()
    r = invoke(tmp_path / "jobs.jsonl", "--ray", address)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and needle in r.output, r.output
    assert time.time() - t0 < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.jsonl"]


def test_job_fields_types_and_paths(tmp_path):
    (tmp_path / "jobs.csv").write_text("name,images,token,init,out,steps,sg,lr,resolution,t-low\n"
                                       "first,refs,<a>,shape,out/a.safetensors,20,false,0.01,none,450\n")
    [job] = runner.load_jobs(tmp_path / "jobs.csv", threads=2)
    c = job.config
    assert (job.name, job.where, c.steps, c.sg, c.lr, c.resolution, c.t_low, c.threads) == \
           ("first", "jobs.csv:2", 20, False, 0.01, None, 450, 2)
    assert c.images == str(tmp_path / "refs") and c.out == str(tmp_path / "out" / "a.safetensors")
    assert c.run_dir == str(tmp_path / "out" / "a.run") and c.model == str(SHAPES_BUNDLE)


# -- sizing ----------------------------------------------------------------------------------------------

def test_how_many_jobs_fit():
    assert runner.fits(cores=2, memory_mb=20000, threads=1, job_mb=150) == 2
    assert runner.fits(cores=16, memory_mb=8000, threads=2, job_mb=2000) == 3   # memory decides
    assert runner.fits(cores=16, memory_mb=100000, threads=4, job_mb=2000) == 4  # cores decide
    assert runner.fits(cores=2, memory_mb=100, threads=1, job_mb=3000) == 1      # never fewer than one
    assert runner.fits(cores=2, memory_mb=None, threads=1, job_mb=3000) == 2


def test_measured_peak_replaces_the_bundle_estimate(tmp_path):
    [job] = runner.load_jobs(write_jobs(tmp_path / "jobs.jsonl", tmp_path, [{}]))
    estimate = runner.bundle_memory_mb(str(SHAPES_BUNDLE))
    assert 100 < estimate < 400  # measured: 122 MB peak for a shapes job
    assert runner.job_memory_mb(job, {}) == estimate
    done = {"x": {"model": job.config.model, "status": "done", "peak_rss_mb": 200.0}}
    assert runner.job_memory_mb(job, done) == pytest.approx(220.0)
    backend = runner.LocalBackend(cores=2, memory_mb=1000)
    assert backend.can_start(1, 600)  # nothing running: always one
    backend.running = {"conn": (None, "key", 1, 600)}
    assert not backend.can_start(1, 600) and backend.can_start(1, 250) and not backend.can_start(2, 250)
    assert runner.RayBackend.options(1, 250, "<s0>") == {"num_cpus": 1, "memory": 250 * 2**20, "name": "zo-edge:<s0>"}


def test_local_backend_runs_any_function_and_reports_its_failures():
    """The scheduler under personalize-many runs any module-level function; here builtins."""
    results = {}
    runner.run_tasks(runner.LocalBackend(workers=2, fn=int), ["12", "x", "7"], lambda k: (k, 1, 0.0, k),
                     lambda k, r, queued: results.__setitem__(k, r))
    assert results["12"] == 12 and results["7"] == 7
    assert results["x"]["status"] == "failed" and results["x"]["error"].startswith("ValueError: invalid literal")
    died = {}
    runner.run_tasks(runner.LocalBackend(fn=os._exit), [3], lambda k: (k, 1, 0.0, "exit"),
                     lambda k, r, queued: died.update(r))
    assert died == {"status": "failed", "retry": True, "error": "the task's process died (exit status 3)"}


def test_runtime_and_runner_do_not_import_ray():
    code = ("import sys, zo_runtime, zo_runtime.personalize, zo_edge.runner, zo_edge.cli.main\n"
            "assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the local runner --------------------------------------------------------------------------------------

def test_batch_records_skips_and_isolates_a_failing_job(refs, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", refs, [{}, {"init": "zzqqxyzzy"}, {"seed": 5}])
    r = invoke(jobs)
    assert r.exit_code == 1
    assert "1 of 3 jobs failed: <s1> (jobs.jsonl:2)" in r.output
    m = manifest(tmp_path / "jobs.results.json")
    assert [m[f"s{k}.safetensors"]["status"] for k in range(3)] == ["done", "failed", "done"]
    assert "single token" in m["s1.safetensors"]["error"]
    for k, kw in ((0, {}), (2, {"seed": 5})):
        rec, out = m[f"s{k}.safetensors"], tmp_path / "out" / f"s{k}.safetensors"
        assert (rec["steps"], rec["forward_passes"], rec["started_from"]) == (12, 36, 0)
        assert rec["seconds"] > 0 and 50 < rec["peak_rss_mb"] < 2000
        assert rec["sha256"] == runner.sha256_file(out) and rec["token_sha256"] == runner.token_sha256(out)
        # each job is a plain personalize run: the same token as one made without the runner
        np.testing.assert_array_equal(load_embeddings(out)[f"<s{k}>"], reference_token(refs, tmp_path, k, **kw))
        assert (tmp_path / "out" / f"s{k}.run" / "checkpoint.npz").is_file()
    stamps = {k: os.stat(tmp_path / "out" / f"s{k}.safetensors").st_mtime_ns for k in (0, 2)}

    r = invoke(jobs)  # again: the two finished jobs are skipped, the failing one fails again
    assert r.exit_code == 1 and "3 jobs: 2 finished already, 1 to run" in r.output
    assert stamps == {k: os.stat(tmp_path / "out" / f"s{k}.safetensors").st_mtime_ns for k in (0, 2)}

    write_jobs(jobs, refs, [{}, {}, {"seed": 5}])  # the user fixes job 2
    r = invoke(jobs)
    assert r.exit_code == 0, r.output
    assert [rec["status"] for rec in manifest(tmp_path / "jobs.results.json").values()] == ["done"] * 3
    assert stamps == {k: os.stat(tmp_path / "out" / f"s{k}.safetensors").st_mtime_ns for k in (0, 2)}

    write_jobs(jobs, refs, [{"seed": 9}, {}, {"seed": 5}])  # a finished job changed: refused, not redone
    r = invoke(jobs)
    assert r.exit_code == 1
    assert "holds a different run (seed: 0 there, 9 in the job)" in manifest(tmp_path / "jobs.results.json")[
        "s0.safetensors"]["error"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(") ")[-1][0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the batch's processes")
def test_kill9_of_the_batch_then_rerun_resumes_bit_for_bit(refs, tmp_path):
    psutil = pytest.importorskip("psutil")
    rows = [{"steps": 90, "checkpoint_every": 10}, {"steps": 90, "checkpoint_every": 10, "seed": 1}]
    jobs = write_jobs(tmp_path / "jobs.jsonl", refs, rows)
    proc = subprocess.Popen([sys.executable, "-m", "zo_edge.cli.main", "personalize-many", str(jobs), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    logs = [tmp_path / "out" / f"s{k}.run" / "log.jsonl" for k in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if all(p.exists() and len(p.read_text().splitlines()) >= 25 for p in logs):
            break
        time.sleep(0.01)
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.kill()  # kill -9 of the batch process; its job processes notice and stop on their own
    proc.wait()
    outs = [tmp_path / "out" / f"s{k}.safetensors" for k in range(2)]
    finished_before = any(p.exists() for p in outs)
    gone = time.time() + 10
    while time.time() < gone and any(_alive(c) for c in children):
        time.sleep(0.1)
    survivors = [c for c in children if _alive(c)]
    for c in survivors:
        os.kill(c, signal.SIGKILL)
    if finished_before:
        pytest.skip("a job finished before the batch could be killed")
    assert not survivors and not any(p.exists() for p in outs), "job processes outlived the batch"

    r = invoke(jobs)
    assert r.exit_code == 0, r.output
    m = manifest(tmp_path / "jobs.results.json")
    for k in range(2):
        rec = m[f"s{k}.safetensors"]
        assert rec["status"] == "done" and rec["started_from"] >= 10  # resumed from a checkpoint
        steps = [json.loads(l)["step"] for l in logs[k].read_text().splitlines()]
        assert steps == list(range(1, 91))
        np.testing.assert_array_equal(load_embeddings(tmp_path / "out" / f"s{k}.safetensors")[f"<s{k}>"],
                                      reference_token(refs, tmp_path, k, **rows[k]))


# -- Ray: a local instance with 2 CPUs --------------------------------------------------------------------

@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: SIGALRM raises in the test after ``seconds`` (POSIX; elsewhere no limit)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'zo-edge[ray]')")
    with time_limit(120):
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_local_runners_tokens(ray_instance, refs, tmp_path):
    rows = [{}, {"init": "zzqqxyzzy"}, {"seed": 5}]
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local = write_jobs(tmp_path / "local" / "jobs.jsonl", refs, rows)
    assert invoke(local).exit_code == 1
    on_ray = write_jobs(tmp_path / "ray" / "jobs.jsonl", refs, rows)
    # the command line, as a user runs it, joins the instance this test started
    r = subprocess.run([sys.executable, "-m", "zo_edge.cli.main", "personalize-many", str(on_ray), "--ray", "auto"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "on Ray cluster with 2 CPUs" in r.stderr
    a, b = manifest(tmp_path / "local" / "jobs.results.json"), manifest(tmp_path / "ray" / "jobs.results.json")
    assert [b[f"s{k}.safetensors"]["status"] for k in range(3)] == ["done", "failed", "done"]
    assert "single token" in b["s1.safetensors"]["error"]
    for k in (0, 2):
        assert b[f"s{k}.safetensors"]["token_sha256"] == a[f"s{k}.safetensors"]["token_sha256"]
        np.testing.assert_array_equal(load_embeddings(tmp_path / "ray" / "out" / f"s{k}.safetensors")[f"<s{k}>"],
                                      load_embeddings(tmp_path / "local" / "out" / f"s{k}.safetensors")[f"<s{k}>"])
        assert b[f"s{k}.safetensors"]["peak_rss_mb"] > 50

    # in-process, on the instance this process joined: the finished jobs are skipped here too
    with time_limit(300):
        state = runner.run_batch(runner.load_jobs(on_ray), tmp_path / "ray" / "jobs.results.json",
                                 runner.RayBackend(None), log=lambda m: None)
    assert state["backend"] == "ray"
    assert [r["status"] for r in state["jobs"]] == ["done", "failed", "done"]
    assert state["jobs"][0]["sha256"] == b["s0.safetensors"]["sha256"]


def test_batch_progress_names_the_running_jobs_steps(refs, tmp_path):
    jobs = runner.load_jobs(write_jobs(tmp_path / "jobs.jsonl", refs, [{"steps": 150}]))
    lines = []
    runner.run_batch(jobs, tmp_path / "m.json", runner.LocalBackend(workers=1), log=lines.append, status_every=0.3)
    status = [l for l in lines if "running: <s0> " in l]
    assert status and status[-1].endswith("/150; 0 queued")
    steps = [int(l.split("running: <s0> ")[1].split("/")[0]) for l in status]
    assert steps == sorted(steps) and 0 < steps[-1] <= 150
    assert lines[-1].startswith("[1/1] <s0> (jobs.jsonl:1) done: ")
    assert runner.last_step(jobs[0].config.run_dir) == 150


def test_ray_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it raises ImportError
    (tmp_path / "jobs.jsonl").write_text(GOOD + "\n")
    r = invoke(tmp_path / "jobs.jsonl", "--ray", "auto")
    assert r.exit_code == 2 and r.output == "zo-edge: error: --ray needs Ray: pip install 'zo-edge[ray]'\n"


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_one_batch_per_manifest(refs, tmp_path):
    import fcntl

    jobs = write_jobs(tmp_path / "jobs.jsonl", refs, [{}])
    with open(tmp_path / "jobs.results.json.lock", "w") as held:  # another batch holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = invoke(jobs)
    assert r.exit_code == 2
    assert r.output == f"zo-edge: error: manifest {tmp_path / 'jobs.results.json'} is in use by another " \
                       "personalize-many; wait for it or pass --manifest\n"
    assert not (tmp_path / "out").exists()
    assert invoke(jobs).exit_code == 0  # released
    r = invoke(jobs, "--manifest", tmp_path / "no" / "such" / "folder.json")
    assert r.exit_code == 2 and "cannot write the manifest" in r.output
