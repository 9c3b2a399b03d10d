"""Shared pytest setup. Area fixtures live in tests/<area>_fixtures.py; add here only what is shared."""

import os
import shutil
import tempfile

os.environ.setdefault("BLIP3_NO_PROGRESS", "1")

# The processes the tests start (CLI runs, torchrun and its workers, Ray's raylet and workers) put
# their temporary files in a folder of this session, removed when it ends: a process that is
# killed rather than exiting (a Ray worker at shutdown) leaves no `torchelastic_*`, `tmp*wandb-*`
# (open_clip imports wandb, which makes them at import) or `pymp-*` folder in the machine's temp
# folder. This process keeps the machine's (`tempfile` reads TMPDIR once): pytest's own `tmp_path`
# folders stay where pytest keeps them.
tempfile.gettempdir()
SCRATCH = tempfile.mkdtemp(prefix="blip3-tests-")  # short: Ray's socket paths must fit 107 bytes
os.environ["TMPDIR"] = SCRATCH


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SCRATCH, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One quiet local Ray cluster (2 CPUs, 1 `accelerator`) for the whole test session; yields its GCS address.

    `datagen.pipeline.run_job` reuses an initialised Ray, so in-process jobs share this cluster;
    subprocesses can join it with `--ray-address <address>`.
    """
    import ray

    from blip3.core.ray_session import remove_session

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # address="local": never join a cluster another process started. Its session folder is under
    # TMPDIR (Ray reads the variable, not tempfile's choice), removed when the cluster stops.
    # `accelerator`: a custom resource standing in for a GPU, so a staged datagen job runs here too
    ray.init(address="local", num_cpus=2, resources={"accelerator": 1}, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        remove_session(session_dir)
