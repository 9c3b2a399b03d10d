"""The one way every command connects to Ray.

- `--ray-address ADDR` (or the standard `RAY_ADDRESS` variable): join that cluster.
- otherwise: start our own quiet local Ray with `address="local"`. Ray's default would read the
  record of the last local cluster (`/tmp/ray/ray_current_cluster`), which outlives the cluster:
  a dead record fails every run with a traceback, a live one belongs to someone else's job. We
  never join a cluster nobody named.
- Ray already initialised in this process (tests, notebooks): reuse it, leave it running.

A cluster started here is shut down on exit and its session folder removed (with the
`session_latest` link to it), so a job leaves no `session_*` folders behind in Ray's temp dir.
That holds when the job is stopped too: `ray.init` replaces the process's SIGTERM handler with
one that exits at once (and Ray's core adds a stack dump to stderr), so the handler in place
before (`blip3`'s: stop as on Ctrl-C, cleaning up on the way out) is put back right after.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from blip3.core.errors import UserError


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Connect for the block; yields True when the cluster was started here (and is stopped after)."""
    import ray

    if ray.is_initialized():
        yield False
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray's C++ core logs one error line per Ray Data actor pool on the driver's stderr
    # (constructor arguments in the object store, ray-project/ray#53727): Ray Data always puts its
    # map function there, so every job would print it. Only fatal core messages go to the
    # terminal; set RAY_BACKEND_LOG_LEVEL (e.g. `info`) to see the rest. Setting it makes the core
    # say so on stderr once, while it starts: that start is quiet (its errors are exceptions).
    quiet_start = "RAY_BACKEND_LOG_LEVEL" not in os.environ
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # Quiet by default: Ray's notice that token authentication is on (its default, which we keep)
    # is not something a user of `blip3 ocr` acts on; real warnings and errors still show.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    held = _hold_sigterm()
    try:
        with _stderr_closed() if quiet_start else nullcontext():
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot connect to Ray: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        field="--ray-address" if address else None) from e
    except KeyboardInterrupt:  # stopped while connecting, or while the cluster started here was starting
        ray.shutdown()
        remove_session(None if address else _session_dir())
        raise
    finally:
        _release_sigterm(held)
    session_dir = None if address else _session_dir()
    try:
        yield not address
    except KeyboardInterrupt:  # Ctrl-C or blip3's SIGTERM: tasks still running, which Ray's core
        with _stderr_closed():  # reports on stderr while it disconnects; the user was told in one line
            ray.shutdown()
        raise
    finally:
        ray.shutdown()  # a no-op after the one above
        remove_session(session_dir)


@contextmanager
def _stderr_closed() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for the block (Ray's core writes to it directly)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _hold_sigterm() -> Any:
    """Keep this process's SIGTERM handler through `ray.init` (see the module's docstring): Ray's
    own is not installed, and the one in place is restored after (Ray's core sets another). Only a
    handler someone chose is kept: with none (Python's default), Ray's exits through `finally`
    blocks, which is better than the default's immediate end."""
    if threading.current_thread() is not threading.main_thread() or not callable(signal.getsignal(signal.SIGTERM)):
        return None
    try:  # a private API: without it, the restore after `ray.init` is what remains
        import ray._private.utils as ray_utils
    except ImportError:
        ray_utils = None
    setter = getattr(ray_utils, "set_sigterm_handler", None)
    if setter is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    return signal.getsignal(signal.SIGTERM), ray_utils, setter


def _release_sigterm(held: Any) -> None:
    if held is None:
        return
    handler, ray_utils, setter = held
    if setter is not None:
        ray_utils.set_sigterm_handler = setter
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


def remove_session(session_dir: str | os.PathLike | None) -> None:
    """Remove a stopped cluster's session folder, the `session_latest` link when it points there,
    and Ray's temp folder when nothing else is left in it."""
    if not session_dir:
        return
    session_dir = os.path.abspath(session_dir)
    shutil.rmtree(session_dir, ignore_errors=True)
    root = os.path.dirname(session_dir)
    latest = os.path.join(root, "session_latest")
    if os.path.islink(latest) and os.path.abspath(os.path.join(root, os.readlink(latest))) == session_dir:
        os.unlink(latest)
    try:
        os.rmdir(root)  # only when empty: another cluster's sessions stay
    except OSError:
        pass


#: Seconds to wait for a named cluster's address to answer: Ray itself retries a dead address
#: for minutes before it gives up.
CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str | None) -> None:
    """One line, within CONNECT_TIMEOUT_S, when a `HOST:PORT` address does not answer (`auto` and
    `ray://` client addresses are left to Ray); a job calls it before any work (None: nothing named)."""
    import socket

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise UserError(f"cannot connect to Ray at {address}: {reason} (is `ray start --head` running there?)",
                        field="--ray-address") from None


def _session_dir() -> str | None:
    """The session folder of the cluster this process started (None if Ray does not say)."""
    try:
        from ray._private.worker import global_worker

        return global_worker.node.get_session_dir_path()
    except Exception:  # a private API: without it we only skip the clean-up
        return None
