"""Shared pytest setup. Area fixtures live in tests/<area>_fixtures.py; add here only what is shared."""

import os

os.environ.setdefault("BLIP3_NO_PROGRESS", "1")


import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One quiet local Ray cluster (2 CPUs) for the whole test session; yields its GCS address.

    `datagen.pipeline.run_job` reuses an initialised Ray, so in-process jobs share this cluster;
    subprocesses can join it with `--ray-address <address>`.
    """
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
