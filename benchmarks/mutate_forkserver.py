"""A fork server for the mutation runs' pytest: third-party imports paid once per module, not per mutant.

One pytest process per mutant spends most of its time importing torch, transformers, pyarrow...
(on a loaded 2-core machine ~10 s of wall time each), which never change between mutants. The
server imports those once, then forks a child per request that runs `pytest.main` in-process; the
child imports `blip3` itself, so it sees the mutated source that cosmic-ray just wrote (the server
never imports `blip3`, and `PYTHONDONTWRITEBYTECODE` keeps no stale bytecode).

    python benchmarks/mutate_forkserver.py serve SOCKET           # started by benchmarks.mutate
    python benchmarks/mutate_forkserver.py run SOCKET -- ARGS...  # cosmic-ray's test command

`run` exits with pytest's status. When cosmic-ray kills `run` (the mutant hung past the timeout),
the server sees the connection close and kills the child's process group. Standard library only in
`run`, so the client starts in milliseconds.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys

#: Imported before forking: what the tested modules import and what costs seconds to import.
PRELOAD = ("numpy", "PIL.Image", "pyarrow", "pyarrow.parquet", "duckdb", "torch", "torch.nn.functional",
           "transformers", "safetensors", "yaml", "pytest")


def _child(args: list[str], cwd: str) -> None:
    os.setpgid(0, 0)  # its own group: the server can kill it with whatever it started
    os.chdir(cwd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        import pytest

        rc = int(pytest.main(args))
    except BaseException:  # noqa: BLE001 - any crash of the run is a failed (killing) test run
        rc = 3
    os._exit(rc)


def _serve_one(conn: socket.socket) -> None:
    request = json.loads(conn.makefile("r").readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        _child(request["args"], request["cwd"])
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            return
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1):  # the client is gone (killed on timeout): stop the run
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return


def serve(path: str) -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not any(m == "blip3" or m.startswith("blip3.") for m in sys.modules), "the server must not import blip3"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    while True:
        conn, _ = server.accept()
        with conn:
            _serve_one(conn)


def run(path: str, args: list[str]) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        conn.sendall((json.dumps({"args": args, "cwd": os.getcwd()}) + "\n").encode())
        reply = conn.makefile("r").readline()
    return int(reply) if reply.strip() else 3


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        raise SystemExit(run(sys.argv[2], sys.argv[4:]))
