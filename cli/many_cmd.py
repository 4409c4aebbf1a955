"""``zo-edge personalize-many``: a jobs file of personalize runs, on local processes or a Ray cluster."""
from __future__ import annotations

import sys

import click


@click.command("personalize-many")
@click.argument("jobs_file", type=click.Path())
@click.option("--model", default="shapes", show_default=True, help="Bundle for the jobs that name none.")
@click.option("--manifest", type=click.Path(), help="Results manifest (JSON) [JOBS_FILE's name + .results.json].")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Local jobs at once (0: as many as the cores and the measured memory per job allow).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="ORT threads per job, for jobs that set none (a Ray task asks for as many CPUs).")
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True,
              help="Attempts more for a job whose process crashed (it resumes from its checkpoint).")
@click.option("--status-every", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds between lines with the running jobs' steps, while none ends.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run the jobs as Ray tasks on an existing cluster: auto, HOST:PORT or ray://HOST:PORT.")
def personalize_many(jobs_file, model, manifest, workers, threads, retries, status_every, ray_address):
    """Run many personalize jobs: one JSONL object or CSV row per job, with images, token, init, out and
    any personalize option (steps, lr, seed, sg, ...; optional name, run_dir). Paths are relative to
    the jobs file. Finished jobs are skipped, interrupted ones resume from their checkpoints, a failing
    job is recorded in the manifest and the rest go on (exit status 1 if any failed)."""
    from zo_edge import runner

    jobs = runner.load_jobs(jobs_file, model=model, threads=threads)
    backend = runner.RayBackend(ray_address) if ray_address else runner.LocalBackend(workers=workers)
    path = manifest or runner.default_manifest(jobs_file)
    state = runner.run_batch(jobs, path, backend, retries=retries, log=lambda m: click.echo(m, err=True),
                             status_every=status_every)
    failed = [r for r in state["jobs"] if r["status"] != "done"]
    click.echo(f"{len(state['jobs']) - len(failed)} of {len(state['jobs'])} jobs done; manifest: {path}")
    if failed:
        click.echo(f"zo-edge: {len(failed)} of {len(state['jobs'])} jobs failed: "
                   + ", ".join(f"{r['name']} ({r['where']})" for r in failed) + f"; errors in {path}", err=True)
        sys.exit(1)


COMMANDS = [personalize_many]
