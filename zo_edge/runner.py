"""Many personalize runs from one jobs file: local processes or Ray tasks, resumable, with a manifest.

    jobs = load_jobs("jobs.jsonl")                          # parsed and checked before any work
    run_batch(jobs, "jobs.results.json", LocalBackend())    # or RayBackend("auto")

Each job is an ordinary ``zo-edge personalize`` run (``PersonalizeConfig`` → ``Trainer``) with its
own run directory, executed in a fresh process (a spawned child, or a Ray worker used for one task),
so its peak RSS is its own. The results manifest is rewritten atomically whenever a job finishes. A
job whose output exists and whose run directory's checkpoint is at the last step is finished; one
whose run directory holds a checkpoint of the same run resumes from it; any other starts fresh.
``zo_runtime`` knows nothing of this module, and Ray is imported only by ``RayBackend``.

Underneath, ``run_tasks`` schedules any module-level function on a backend (``LocalBackend`` or
``RayBackend``, ``fn=``); ``zo-edge bench quality`` runs its runs through it too.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from zo_edge.models import resolve_model
from zo_runtime.errors import UserError
from zo_runtime.manifest import sha256_file
from zo_runtime.outputs import write_json
from zo_runtime.personalize import CHECKPOINT, PersonalizeConfig, Trainer
from zo_runtime.sysinfo import peak_rss_mb

REQUIRED = ("images", "token", "init", "out")
# Fields a job may set: every personalize option, plus a display name.
FIELDS = {f.name: f for f in dataclasses.fields(PersonalizeConfig) if f.name not in ("overwrite", "templates")}
PATH_FIELDS = ("images", "out", "run_dir", "captions")
# Fields that may differ between a run directory's config.json and the job that resumes it.
FREE_ON_RESUME = ("run_dir", "threads", "provider", "overwrite", "checkpoint_every", "preview_every")


@dataclass
class Job:
    name: str
    config: PersonalizeConfig
    where: str                 # "jobs.jsonl:3", for messages

    def spec(self) -> dict:
        """What a worker process needs (``run_job``'s argument): plain data, picklable and JSON-able."""
        cfg = dataclasses.asdict(self.config)
        cfg["templates"] = list(self.config.templates)
        return {"name": self.name, "config": cfg}


# -- the jobs file ------------------------------------------------------------------------------

def load_jobs(path: str | Path, model: str = "shapes", threads: int = 1) -> list[Job]:
    """Parse a JSONL or CSV jobs file; every problem is a UserError naming the line (and field).

    Relative paths in a job are taken from the jobs file's folder. ``model`` and ``threads`` are
    the defaults for jobs that set none; ``run_dir`` defaults to the output path with ``.run``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"jobs file {str(p)!r} does not exist")
    if p.suffix.lower() in (".jsonl", ".json"):
        rows = _jsonl_rows(p)
    elif p.suffix.lower() == ".csv":
        rows = _csv_rows(p)
    else:
        raise UserError(f"jobs file {p.name!r}: expected a .jsonl or .csv file")
    jobs = [_make_job(row, where, p.parent, model, threads) for where, row in rows]
    if not jobs:
        raise UserError(f"jobs file {p} holds no jobs")
    _check_unique(jobs)
    return jobs


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{k}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object {{\"images\": ..., \"token\": ...}}")
        rows.append((where, row))
    return rows


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            if None in row:
                raise UserError(f"{where}: more values than the header has fields")
            rows.append((where, {k: v for k, v in row.items() if k is not None and v not in (None, "")}))
    return rows


def _make_job(row: dict, where: str, base: Path, model: str, threads: int) -> Job:
    row = {str(k).strip().replace("-", "_"): v for k, v in row.items()}
    name = row.pop("name", None)
    unknown = sorted(k for k in row if k not in FIELDS)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (fields: name, {', '.join(FIELDS)})")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise UserError(f"{where}: missing field {', '.join(repr(k) for k in missing)}")
    values = {k: _coerce(v, FIELDS[k], where) for k, v in row.items()}
    for k in PATH_FIELDS:
        if values.get(k) is not None:
            values[k] = str((base / values[k]).resolve())
    values["model"] = _model_path(values.get("model", model), base)
    values.setdefault("threads", threads)
    values.setdefault("run_dir", str(Path(values["out"]).with_suffix(".run")))
    cfg = PersonalizeConfig(**values)
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return Job(name=str(name) if name is not None else cfg.token, config=cfg, where=where)


def _model_path(model: str, base: Path) -> str:
    resolved = resolve_model(model)
    return resolved if resolved != model else str((base / model).resolve())


def _coerce(value, f: dataclasses.Field, where: str):
    """A JSON value or CSV text -> the config field's type (int, float, bool, str, or None)."""
    kind = str(f.type).split("|")[0].strip()
    optional = "None" in str(f.type)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    bad = UserError(f"{where}: field {f.name!r}: expected {_KIND_WORDS.get(kind, kind)}, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise bad
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
        raise bad
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        raise bad
    if not isinstance(value, str) or not value.strip():
        raise bad
    return value


_BOOLS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}
_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_unique(jobs: list[Job]) -> None:
    for field in ("out", "run_dir"):
        seen: dict[str, Job] = {}
        for job in jobs:
            value = getattr(job.config, field)
            if value in seen:
                raise UserError(f"{job.where}: {field} {value} is also the {field} of the job at "
                                f"{seen[value].where}; each job needs its own")
            seen[value] = job
    outs = {job.config.out: job for job in jobs}
    for job in jobs:
        if job.config.run_dir in outs:
            raise UserError(f"{job.where}: run_dir {job.config.run_dir} is the out of the job at "
                            f"{outs[job.config.run_dir].where}")


# -- one job, in a worker process ----------------------------------------------------------------

def token_sha256(path: str | Path) -> str:
    """sha256 of the learned vectors (placeholder, shape, float32 bytes). Equal tokens give equal
    digests; the file's own sha256 can differ between processes, because safetensors writes the
    metadata entries in an order of its own (a hash map's)."""
    import numpy as np

    from zo_runtime.embeddings import load_embeddings

    h = hashlib.sha256()
    for name, arr in sorted(load_embeddings(path).items()):
        h.update(f"{name}\0{list(arr.shape)}\0".encode())
        h.update(np.ascontiguousarray(arr, np.float32).tobytes())
    return h.hexdigest()


def _identity(cfg: dict) -> dict:
    d = json.loads(json.dumps(cfg))
    return {k: v for k, v in d.items() if k not in FREE_ON_RESUME}


def _checkpoint_step(run_dir: Path) -> int:
    import numpy as np

    with np.load(run_dir / CHECKPOINT, allow_pickle=False) as z:
        return int(z["step"])


def run_state(cfg: PersonalizeConfig) -> tuple[str, int]:
    """("fresh" | "resume" | "finished", checkpoint step). A run directory holding a different
    run, or an output left by something else, is a UserError: the job fails, nothing is replaced."""
    run_dir, out = Path(cfg.run_dir), Path(cfg.out)
    stored = run_dir / "config.json"
    if not (run_dir / CHECKPOINT).is_file() or not stored.is_file():
        return "fresh", 0
    mine = _identity(dataclasses.asdict(cfg.resolved()))  # config.json holds the resolved recipe
    theirs = _identity(json.loads(stored.read_text()))
    diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if diff:
        k = diff[0]
        raise UserError(f"run directory {run_dir} holds a different run ({k}: {theirs.get(k)!r} there, "
                        f"{mine.get(k)!r} in the job); remove it or give the job another run_dir")
    step = _checkpoint_step(run_dir)
    if step >= cfg.steps and out.is_file():
        return "finished", step
    if out.exists():
        raise UserError(f"output {out} exists but its run {run_dir} stopped at step {step} of {cfg.steps}; "
                        "remove one of them")
    return "resume", step


def _finished_record(cfg: PersonalizeConfig) -> dict:
    """Steps and passes of a run that finished before the manifest heard of it, from its files."""
    import numpy as np

    with np.load(Path(cfg.run_dir) / CHECKPOINT, allow_pickle=False) as z:
        return {"steps": int(z["step"]), "forward_passes": int(z["forward_passes"])}


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send this process's stderr (Python's and native code's) to a file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_job(spec: dict) -> dict:
    """Run (or resume, or recognise as finished) one job; never raises. Its stderr goes to
    ``run_dir/job.log``. ``retry`` in the result says whether another attempt could help."""
    d = dict(spec["config"])
    d["templates"] = tuple(d["templates"])
    cfg = PersonalizeConfig(**d)
    t0 = time.time()
    record = {"status": "failed", "host": socket.gethostname(), "pid": os.getpid(), "retry": False}
    try:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        with _stderr_to(Path(cfg.run_dir) / "job.log"):
            state, step = run_state(cfg)
            record["started_from"] = step
            if state == "finished":
                record.update(_finished_record(cfg))
            else:
                result = Trainer(cfg, resume=state == "resume").train(resume=state == "resume")
                record.update(steps=result.steps, forward_passes=result.forward_passes)
        record.update(status="done", sha256=sha256_file(cfg.out), token_sha256=token_sha256(cfg.out))
    except UserError as e:
        record["error"] = str(e)
    except Exception as e:  # noqa: BLE001 -- any failure of one job is recorded, the batch goes on
        record.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                      retry=True)
    record.update(seconds=round(time.time() - t0, 3), peak_rss_mb=round(peak_rss_mb(), 1))
    return record


# -- sizing ----------------------------------------------------------------------------------------

def available_memory_mb() -> float | None:
    """MemAvailable (Linux), else physical memory; None where neither can be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    return None


@functools.lru_cache(maxsize=None)
def bundle_memory_mb(model: str) -> float:
    """A job's peak RSS before one has been measured: what training loads (everything but the VAE
    decoder) three times over, plus the interpreter. Measured: shapes 122 MB (estimate 154 MB)."""
    root = Path(model)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and "vae_decoder" not in f.parts)
    return 3 * size / 2**20 + 100


def fits(cores: int, memory_mb: float | None, threads: int, job_mb: float) -> int:
    """How many jobs of ``threads`` threads and ``job_mb`` peak RSS run at once (at least one)."""
    by_cpu = max(1, cores // max(1, threads))
    if memory_mb is None:
        return by_cpu
    return max(1, min(by_cpu, int(0.9 * memory_mb // max(job_mb, 1.0))))


# -- backends ----------------------------------------------------------------------------------------

def _watch_parent(parent: int) -> None:
    """A worker whose batch process died (kill -9) stops too, instead of running on unseen."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def _failure(e: BaseException) -> dict:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {"status": "failed", "retry": True, "error": f"{type(e).__name__}: {first}".rstrip(": ")}


def _child(fn, spec: dict, conn, parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        result = fn(spec)
    except Exception as e:  # noqa: BLE001 -- reported as the task's failure
        result = _failure(e)
    conn.send(result)
    conn.close()


class LocalBackend:
    """Tasks as spawned processes on this machine, as many at once as cores and memory allow (or
    ``workers``). A task is ``fn(spec)`` (a module-level function; personalize-many's: ``run_job``),
    in a fresh process that stops if the process that started it dies."""

    name = "local"

    def __init__(self, workers: int = 0, cores: int | None = None, memory_mb: float | None = None, fn=None):
        self.workers = workers                       # 0: as many as fit
        self.cores = cores or os.cpu_count() or 1
        self.memory_mb = memory_mb if memory_mb is not None else available_memory_mb()
        self.fn = fn or run_job
        self.running: dict = {}                      # connection -> (process, key, threads, memory MB)
        self.exiting: list = []                      # processes that answered and are shutting down

    def describe(self, threads: int, job_mb: float) -> str:
        n = self.workers or fits(self.cores, self.memory_mb, threads, job_mb)
        mem = f"{self.memory_mb / 1024:.1f} GB available" if self.memory_mb else "memory unknown"
        how = "--workers" if self.workers else f"{self.cores} cores, {mem}"
        return f"local processes, up to {n} at once ({how}; {threads} thread(s), ~{job_mb:.0f} MB each)"

    def can_start(self, threads: int, memory_mb: float) -> bool:
        if not self.running:
            return True
        if self.workers:
            return len(self.running) < self.workers
        busy = sum(max(1, t) for _, _, t, _ in self.running.values()) + max(1, threads)
        memory = sum(m for _, _, _, m in self.running.values()) + memory_mb
        return busy <= self.cores and (self.memory_mb is None or memory <= 0.9 * self.memory_mb)

    def submit(self, key, spec: dict, threads: int = 1, memory_mb: float = 0.0, name: str = "task") -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(self.fn, spec, send, os.getpid()), name=f"zo-edge-{name}")
        proc.start()
        send.close()
        self.running[recv] = (proc, key, threads, memory_mb)

    def wait(self, timeout: float | None = None) -> list[tuple]:
        """(key, result) of the tasks that ended; an empty list when ``timeout`` seconds passed first."""
        from multiprocessing.connection import wait

        done = []
        for conn in wait(list(self.running), timeout):
            proc, key, _, _ = self.running.pop(conn)
            try:
                result = conn.recv()
                self.exiting.append(proc)  # it has answered; the next task need not wait for its exit
            except EOFError:
                proc.join()
                result = {"status": "failed", "retry": True,
                          "error": f"the task's process died (exit status {proc.exitcode})"}
            conn.close()
            done.append((key, result))
        self.exiting = [p for p in self.exiting if p.is_alive()]  # reaps those that have exited
        return done

    def running_keys(self) -> list:
        return [key for _, key, _, _ in self.running.values()]

    def close(self) -> None:
        for proc, _, _, _ in self.running.values():
            proc.kill()
        for proc in self.exiting:
            proc.join(30)


def check_ray_address(address: str) -> None:
    """Fail fast, with one line, on an address that cannot be a reachable Ray cluster (ray.init
    itself waits a long time on an unreachable host:port)."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--ray expects auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}") from None


class RayBackend:
    """Tasks as Ray tasks on an existing cluster (or the one this process already joined). Each asks
    for its threads as CPUs and its memory estimate as memory, and runs in a worker of its own
    (``max_calls=1``), so its peak RSS is its own. Paths must be valid on every node; ``fn`` must be
    importable there (a module-level function of zo-edge)."""

    name = "ray"

    def __init__(self, address: str | None = "auto", fn=None):
        if address is not None:
            check_ray_address(address)
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs Ray: pip install 'zo-edge[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except Exception as e:  # noqa: BLE001 -- ConnectionError, RuntimeError, ... : one line
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot connect to Ray at {address}: {first}") from None
        self.remote = ray.remote(max_calls=1, max_retries=0)(fn or run_job)
        self.running: dict = {}                      # ObjectRef -> key

    def describe(self, threads: int, job_mb: float) -> str:
        cpus = self.ray.cluster_resources().get("CPU", 0)
        return f"Ray cluster with {cpus:.0f} CPUs ({threads} per task, {job_mb:.0f} MB requested each)"

    @staticmethod
    def options(threads: int, memory_mb: float, name: str) -> dict:
        return {"num_cpus": max(1, threads), "memory": int(memory_mb * 2**20), "name": f"zo-edge:{name}"}

    def can_start(self, threads: int, memory_mb: float) -> bool:
        return True  # Ray queues tasks until their CPUs and memory are free

    def submit(self, key, spec: dict, threads: int = 1, memory_mb: float = 0.0, name: str = "task") -> None:
        self.running[self.remote.options(**self.options(threads, memory_mb, name)).remote(spec)] = key

    def wait(self, timeout: float | None = None) -> list[tuple]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            key = self.running.pop(ref)
            try:
                result = self.ray.get(ref)
            except Exception as e:  # noqa: BLE001 -- the task raised, its worker died, or it was lost
                result = _failure(e)
            done.append((key, result))
        return done

    def running_keys(self) -> list:
        return list(self.running.values())

    def close(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)


def run_tasks(backend, keys, plan, on_done, on_idle=None, idle_every: float = 60.0) -> None:
    """Run a task per key on ``backend`` as its capacity allows. ``plan(key)`` -> (spec, threads,
    memory MB, name), asked when the task starts; ``on_done(key, result, queued)`` as each ends,
    returning True to queue the key again (a retry); ``on_idle(queued)`` after ``idle_every`` s
    without one ending. Tasks still running when this stops (an exception, Ctrl-C) are stopped."""
    queue = list(keys)
    try:
        while queue or backend.running:
            while queue:
                spec, threads, memory_mb, name = plan(queue[0])
                if not backend.can_start(threads, memory_mb):
                    break
                backend.submit(queue.pop(0), spec, threads, memory_mb, name)
            finished = backend.wait(idle_every)
            if not finished and on_idle is not None:
                on_idle(len(queue))
            for key, result in finished:
                if on_done(key, result, len(queue)):
                    queue.insert(0, key)
    finally:
        backend.close()


# -- the manifest and the batch -------------------------------------------------------------------

RESULT_KEYS = ("status", "sha256", "token_sha256", "steps", "forward_passes", "seconds", "peak_rss_mb", "error",
               "started_from", "host", "pid")


def read_manifest(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        return {"jobs": []}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        raise UserError(f"manifest {p} is not valid JSON; move it away to start a fresh record") from None
    return data if isinstance(data, dict) and isinstance(data.get("jobs"), list) else {"jobs": []}


def default_manifest(jobs_file: str | Path) -> str:
    p = Path(jobs_file)
    return str(p.with_name(p.stem + ".results.json"))


def config_sha(cfg: PersonalizeConfig) -> str:
    """A fingerprint of what determines a job's result (not where it runs or how often it checkpoints)."""
    identity = _identity(dataclasses.asdict(cfg.resolved()))
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _already_done(record: dict | None, job: Job) -> bool:
    out = Path(job.config.out)
    return bool(record and record.get("status") == "done" and record.get("config_sha") == config_sha(job.config)
                and out.is_file() and record.get("sha256") == sha256_file(out))


def job_memory_mb(job: Job, records: dict) -> float:
    """The largest peak RSS measured for this job's model so far (+10 %), else the bundle estimate."""
    measured = [r["peak_rss_mb"] for r in records.values()
                if r.get("model") == job.config.model and r.get("status") == "done" and r.get("peak_rss_mb")]
    return 1.1 * max(measured) if measured else bundle_memory_mb(job.config.model)


@contextlib.contextmanager
def manifest_lock(path: Path):
    """One batch per manifest at a time: an exclusive flock on ``<manifest>.lock`` while it runs (the
    kernel drops it when the process dies, so a kill -9 leaves nothing stale). No-op without flock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write the manifest {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"manifest {path} is in use by another personalize-many; wait for it or pass "
                            "--manifest") from None
        yield
    finally:
        os.close(fd)


def run_batch(jobs: list[Job], manifest: str | Path, backend, retries: int = 1, log=print,
              status_every: float = 60.0) -> dict:
    """Run every job not finished yet; rewrite the manifest as each one ends; every ``status_every``
    seconds without one ending, log the running jobs' steps. Returns the manifest."""
    with manifest_lock(Path(manifest)):
        return _run_batch(jobs, Path(manifest), backend, retries, log, status_every)


def _run_batch(jobs: list[Job], path: Path, backend, retries: int, log, status_every: float) -> dict:
    old = {r.get("out"): r for r in read_manifest(path)["jobs"]}
    records = {}
    for job in jobs:
        prev = old.get(job.config.out)
        base = {"name": job.name, "where": job.where, "out": job.config.out, "run_dir": job.config.run_dir,
                "model": job.config.model, "config_sha": config_sha(job.config)}
        records[job.config.out] = {**prev, **base} if _already_done(prev, job) else {**base, "status": "pending"}
    attempts = {job.config.out: 0 for job in jobs}
    state = {"backend": backend.name, "jobs": list(records.values())}

    def save(running: str = "running"):
        for key in backend.running_keys():
            if records[key]["status"] in ("pending", "running"):
                records[key]["status"] = running
        state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(path, state)

    queue = [job for job in jobs if records[job.config.out]["status"] != "done"]
    skipped = len(jobs) - len(queue)
    threads = max(job.config.threads for job in jobs)
    log(f"{len(jobs)} jobs: {skipped} finished already, {len(queue)} to run on "
        f"{backend.describe(threads, max(job_memory_mb(j, records) for j in jobs))}")
    save()
    t0, ended = time.time(), [0]
    by_key = {job.config.out: job for job in jobs}

    def plan(key):
        job = by_key[key]
        memory = job_memory_mb(job, records)
        return job.spec(), job.config.threads, memory, job.name

    def on_done(key, result, queued) -> bool:
        job, rec = by_key[key], records[key]
        attempts[key] += 1
        retry = result.pop("retry", False) and attempts[key] <= retries
        for k in RESULT_KEYS:
            rec.pop(k, None)
        rec.update(result, status="pending" if retry else result["status"], attempts=attempts[key])
        save()
        if retry:
            log(f"retrying {job.name} ({job.where}): {result.get('error')}")
            return True
        ended[0] += 1
        left = queued + len(backend.running)
        log(_progress_line(job, rec, ended[0], left, skipped, len(jobs), time.time() - t0))
        return False

    def on_idle(queued):
        save()  # the running jobs' status
        log(_status_line([by_key[k] for k in backend.running_keys()], queued, ended[0], skipped, len(jobs)))

    try:
        run_tasks(backend, [job.config.out for job in queue], plan, on_done, on_idle, status_every)
    finally:
        save(running="interrupted")  # jobs still running here were stopped
    return state


def last_step(run_dir: str | Path) -> int:
    """The step of a run's last log line (0 before the first), read from the end of log.jsonl."""
    path = Path(run_dir) / "log.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _status_line(running: list[Job], queued: int, ended: int, skipped: int, total: int) -> str:
    steps = ", ".join(f"{job.name} {last_step(job.config.run_dir)}/{job.config.steps}" for job in running)
    return f"[{skipped + ended}/{total}] running: {steps or '-'}; {queued} queued"


def _progress_line(job: Job, rec: dict, ended: int, left: int, skipped: int, total: int, elapsed: float) -> str:
    head = f"[{skipped + ended}/{total}] {job.name} ({job.where}) "
    if rec["status"] == "done":
        body = (f"done: {rec['out']} ({rec.get('steps')} steps, {rec.get('forward_passes')} passes, "
                f"{rec.get('seconds', 0):.1f} s, peak {rec.get('peak_rss_mb', 0):.0f} MB)")
    else:
        body = f"FAILED: {rec.get('error')}"
    eta = elapsed / ended * left if left else 0.0
    return head + body + (f"; {left} left, about {_fmt(eta)} to go" if left else "")


def _fmt(seconds: float) -> str:
    s = int(math.ceil(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
