"""SIGTERM (and SIGINT) mid-run: one line, a clean stop, and no Ray session folder left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # starts its own Ray cluster in a subprocess (~15 s)


class HangingServer:
    """An HTTP server on 127.0.0.1 that accepts and never answers: a job fetching from it is
    certainly mid-run (Ray up, a task running) when `connected` is set."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connected = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.connected.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def _processes_under(folder: str) -> list[str]:
    """Command lines of live processes that name `folder` (Ray's raylet, GCS, workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder in cmd:
            found.append(cmd[:200])
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_job_says_one_line_and_leaves_no_ray_session(tmp_path, signum):
    server = HangingServer()
    temp = tempfile.mkdtemp(prefix="b3sig", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        urls = tmp_path / "urls.csv"
        urls.write_text("url,uid\n" + "".join(f"{server.url}/{i}.png,u{i}\n" for i in range(4)))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(TMPDIR=temp, BLIP3_NO_PROGRESS="1")
        proc = subprocess.Popen([sys.executable, "-m", "blip3.cli", "ocr", str(urls), str(tmp_path / "out"),
                                 "--workers", "1", "--db", str(tmp_path / "c.duckdb")],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert server.connected.wait(180), "the job never fetched"
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        lines = [line for line in (out + err).splitlines() if line.strip()]
        name = signal.Signals(signum).name
        assert proc.returncode == 128 + signum, (out, err)
        assert lines == [f"stopped: {name}; finished work is kept (run the same command again to continue)"], lines
        assert not (Path(temp) / "ray").exists(), sorted(str(p) for p in (Path(temp) / "ray").rglob("*"))[:10]
        deadline = time.monotonic() + 20
        while _processes_under(temp) and time.monotonic() < deadline:  # Ray's processes end on their own
            time.sleep(0.5)
        assert not _processes_under(temp)
    finally:
        server.close()
        shutil.rmtree(temp, ignore_errors=True)
