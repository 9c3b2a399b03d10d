"""The same job in blip3, NeMo Curator and Data-Juicer, side by side: marginal CPU per image over
each tool's whole process tree, against a plain loop.

    python benchmarks/bench_peers.py [--sizes 2000,10000] [--repeat 2] [--setup-only] [--keep DIR]
                                     [--tools blip3,nemo-curator,data-juicer,data-juicer-per-sample]

The job: a folder of JPEGs (320x240 scenes and their COCO box file, made as `bench_datagen.py`
makes them); read each, decode it, caption it from its COCO boxes, write tar shards of 1,000.

- `blip3`: `blip3 ground IN -o OUT --detector annotations --annotations coco.json --shard-size 1000
  --workers 2`, the CLI script beside this interpreter, importing the checkout this script sits
  in (put first on its `PYTHONPATH`), so a rewrite of the pipeline is measured by the same script.
- `nemo-curator` (1.4.0, `[image-cpu]`): `benchmarks/peers/job_nemo.py`, a NeMo Curator pipeline
  (file partitioning, a read + decode stage, a caption stage, NeMo's `ImageWriterStage`) on its
  default Xenna executor, which runs on Ray. NeMo's own image reader cannot read this job: it reads
  webdataset tars only and needs NVIDIA DALI; its writer re-encodes every image from pixels.
- `data-juicer` (1.6.1): `benchmarks/peers/job_dj.py`, a Data-Juicer recipe on its Ray executor
  (Ray Data): JSONL of image paths, one custom mapper op (read, decode, caption; batched, 1,000
  rows a call), exported as webdataset tars. `data-juicer-per-sample`: the same op in its
  one-sample-per-call form (`process_single`, Data-Juicer's default form of a mapper).
- `plain loop`: one process, no framework (`benchmarks/peers/job_loop.py`): list, read, decode,
  caption, tarfile + one parquet per shard; `plain loop, re-encode` also re-encodes each image
  (JPEG quality 92, as NeMo's writer does), the loop a NeMo job is compared against.

Each tool runs in its own venv under `benchmarks/.venvs/<tool>` (git-ignored), made from PyPI by
this script on first use (`--setup-only` makes them and stops; torch, which NeMo Curator requires,
is constrained to the CPU wheel: `--torch`). blip3 and the loops run in this interpreter's
environment.

The figure: every job runs as a child process of this one, which is made the subreaper of its
descendants (Ray's daemons stay in its tree even when their parent exits) and sums the CPU
seconds of the whole tree, sampled every 50 ms (Ray's daemons, workers and actors included).
Each tool runs at two sizes, `--repeat` times, alternating; the marginal CPU per image
(cpu(N2) - cpu(N1)) / (N2 - N1), pooled over the pairs, cancels start-up and shut-down (Ray
starting, imports, actors). That holds only when both sizes start the same workers: a blip3 job
starts no more annotator actors than it has shards of 1,000, so the smaller size has at least
`--workers` (2) shards by default (an earlier default of 1,000 -> 4,000 images put the second
actor's start, ~2.3 CPU-s, into the marginal). `vs loop` = that marginal / the loop's marginal:
1.0x is the loop's cost, lower is better. Results go to benchmarks/results/bench_peers.json.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
VENVS = HERE / ".venvs"
SHARD_SIZE = 1000
NICE = ["nice", "-n", "15"]


@dataclass(frozen=True)
class Tool:
    """A peer installed into its own venv: what pip installs there, and the job script it runs."""

    name: str
    requirements: tuple[str, ...]
    job: str
    # the Ray of the project's own lock, so that the tools differ in what they do on it
    constraints: tuple[str, ...] = ("ray==2.60.0",)

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def stamp(self) -> str:
        return hashlib.sha256(json.dumps([self.requirements, self.constraints]).encode()).hexdigest()[:16]


PEER_TOOLS = {
    t.name: t
    for t in (
        Tool("nemo-curator", ("nemo-curator[image-cpu]==1.4.0", "ray[data,default]==2.60.0"), "job_nemo.py"),
        Tool("data-juicer", ("py-data-juicer==1.6.1", "ray[data,default]==2.60.0", "pillow"), "job_dj.py"),
    )
}


#: torch, which NeMo Curator requires, as the CPU build (no CUDA libraries in the venv); on a
#: machine whose pip finds no such wheel, `--torch torch==2.14.1` takes requirements.lock's
DEFAULT_TORCH = "torch==2.13.0+cpu"


def ensure_venv(tool: Tool, log: Path, torch: str = DEFAULT_TORCH) -> None:
    """Create `tool`'s venv and install it from PyPI unless the venv already holds this spec.

    Wheels only first (`--only-binary=:all:`); if some dependency ships only a source archive
    (NeMo Curator's `comment_parser`, Data-Juicer's `emoji==2.2.0`), again with `--prefer-binary`
    (wheels where they exist). `torch` is a constraint: installed only where the tool needs it."""
    tool = Tool(tool.name, tool.requirements, tool.job, (*tool.constraints, torch))
    stamp = tool.venv / ".bench-peers-installed"
    if stamp.exists() and stamp.read_text() == tool.stamp():
        return
    if tool.venv.exists():
        shutil.rmtree(tool.venv)
    VENVS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(tool.venv)], check=True)
    constraints = tool.venv / "constraints.txt"
    constraints.write_text("\n".join(tool.constraints) + "\n")
    pip = [*NICE, str(tool.python), "-m", "pip", "install", "-q", "-c", str(constraints), *tool.requirements]
    with log.open("a") as out:
        print(f"installing {tool.name} into {tool.venv} (log: {log})", flush=True)
        if subprocess.run([*pip, "--only-binary=:all:"], stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            print(f"  {tool.name}: not every dependency has a wheel; again with --prefer-binary", flush=True)
            subprocess.run([*pip, "--prefer-binary"], stdout=out, stderr=subprocess.STDOUT, check=True)
    stamp.write_text(tool.stamp())


ROLES = ("main", "ray workers", "other")
_WORKER_MARKS = ("ray::", "default_worker.py", "setup_worker.py")  # setup_worker execs into a worker


class JobMonitor:
    """CPU seconds of every process below this one (not this one), sampled every `interval` s.

    A process born during the run counts from zero (so its start-up is counted, not lost until the
    first sample). This process is made the subreaper of its descendants first (`prctl`), so a Ray
    daemon whose parent exits is re-parented here and stays in the tree; a descendant that exits
    between two samples loses at most its last interval, alike at both sizes of a pair.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}  # pid -> command line, first seen
        self._before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def descendants() -> list:
        import psutil

        try:
            return psutil.Process().children(recursive=True)
        except psutil.Error:
            return []

    def _sample(self) -> None:
        import psutil

        for p in self.descendants():
            if p.pid in self._before:
                continue
            try:
                t = p.cpu_times()
                if p.pid not in self.names:
                    self.names[p.pid] = " ".join(p.cmdline()) or p.name()
            except psutil.Error:
                continue
            self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), t.user + t.system)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())

    def by_role(self, main_pid: int) -> dict[str, float]:
        """CPU seconds split into the job's main process, Ray's workers (tasks and actors, started
        by a raylet) and everything else (Ray's daemons: gcs, raylet, monitors, agents; helpers)."""
        roles = dict.fromkeys(ROLES, 0.0)
        for pid, seconds in self.cpu.items():
            name = self.names.get(pid, "")
            role = "main" if pid == main_pid else \
                "ray workers" if any(mark in name for mark in _WORKER_MARKS) else "other"
            roles[role] += seconds
        return roles

    def __enter__(self) -> "JobMonitor":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        _reap()
        alive = _alive()
        if alive:
            names = [" ".join(p.cmdline())[:80] for p in alive]
            raise RuntimeError(f"a job starts with child processes still running (their CPU would count): {names}")
        self._before = {p.pid for p in self.descendants()}  # zombies not reaped yet: not this job's
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _reap() -> None:
    """Reap the exited orphans re-parented here."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _alive() -> list:
    import psutil

    alive = []
    for p in JobMonitor.descendants():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def _reap_and_wait(timeout: float = 30.0) -> list[str]:
    """After a job's main process exits, wait for its descendants (Ray's daemons shut down in
    their own time), reaping the orphans re-parented here; kill any left after `timeout` (their
    CPU until then counts: they are the job's). Returns the command lines of those killed."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        _reap()
        alive = _alive()
        if not alive:
            return []
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    names = []
    for p in alive:
        try:
            names.append(" ".join(p.cmdline()).strip()[:80])
            p.kill()
        except psutil.Error:
            pass
    for _ in range(100):
        _reap()
        if not _alive():
            break
        time.sleep(0.1)
    return names


@dataclass
class Run:
    """One job: `images` in, CPU seconds of its whole process tree, wall seconds, samples out."""

    tool: str
    images: int
    cpu_s: float
    wall_s: float
    samples_out: int
    cpu_by_role: dict[str, float]
    killed: list[str] = field(default_factory=list)


def count_samples(out: Path) -> int:
    """JPEG members over every tar of `out` (each tool writes one per sample)."""
    import tarfile

    total = 0
    for tar_path in out.rglob("*.tar"):
        with tarfile.open(tar_path) as tar:
            total += sum(1 for m in tar if m.name.endswith(".jpg"))
    return total


def job_command(tool: str, images: Path, coco: Path, out: Path, workers: int) -> list[str]:
    """The command line of `tool`'s job over the folder `images`."""
    if tool == "blip3":
        blip3 = Path(sys.executable).parent / "blip3"
        return [str(blip3), "ground", str(images), "-o", str(out), "--detector", "annotations",
                "--annotations", str(coco), "--shard-size", str(SHARD_SIZE), "--workers", str(workers),
                "--db", str(out.parent / f"{out.name}.duckdb")]
    if tool in ("plain loop", "plain loop, re-encode"):
        return [sys.executable, str(PEERS / "job_loop.py"), str(images), str(coco), str(out),
                "--shard-size", str(SHARD_SIZE), *(["--reencode"] if "re-encode" in tool else [])]
    peer = PEER_TOOLS[VARIANTS.get(tool, tool)]
    return [str(peer.python), str(PEERS / peer.job), str(images), str(coco), str(out),
            "--shard-size", str(SHARD_SIZE), "--cpus", str(workers), *(["--per-sample"] if tool in VARIANTS else [])]


def run_job(tool: str, images: Path, coco: Path, out: Path, workers: int, log: Path) -> Run:
    """Run one job as a child process under `nice -n 15`; its whole tree's CPU, wall, output."""
    n = sum(1 for _ in images.glob("*.jpg"))
    env = {**os.environ, "BLIP3_NO_PROGRESS": "1", "BENCH_PEERS_TMP": str(out.parent), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # every job starts its own local Ray, never joins one
    if tool == "blip3":  # `blip3` imports this checkout (the repo root is the package), whatever is installed
        pkg = out.parent / "checkout"
        if not (pkg / "blip3").exists():
            pkg.mkdir(exist_ok=True)
            (pkg / "blip3").symlink_to(ROOT)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pkg), env.get("PYTHONPATH")) if p)
    peer = PEER_TOOLS.get(VARIANTS.get(tool, tool))
    if peer:  # a clean environment of the peer's own venv
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = f"{peer.venv / 'bin'}:{env['PATH']}"
    t = time.perf_counter()
    with JobMonitor() as mon, log.open("a") as out_log:
        out_log.write(f"\n=== {tool}, {n} images\n")
        out_log.flush()
        # `nice` execs the job: the child's pid is the job's main process
        proc = subprocess.Popen([*NICE, *job_command(tool, images, coco, out, workers)], env=env,
                                stdout=out_log, stderr=subprocess.STDOUT, cwd=out.parent)
        proc.wait()
        killed = _reap_and_wait()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed (exit {proc.returncode}) on {n} images; its output is in {log}")
    got = count_samples(out)
    if got != n:
        raise RuntimeError(f"{tool} wrote {got} samples for {n} images; its output is in {log}")
    return Run(tool, n, mon.cpu_s, wall, got, mon.by_role(proc.pid), killed)


def marginal(pairs: list[tuple[Run, Run]]) -> float:
    """Marginal CPU seconds per image pooled over (small, large) pairs:
    sum(cpu(large) - cpu(small)) / sum(images(large) - images(small)).
    Fixed costs (start-up, shut-down) are alike in both runs of a pair and cancel."""
    extra = sum(big.images - small.images for small, big in pairs)
    if extra <= 0:
        raise ValueError("each pair needs more images in its second run")
    return sum(big.cpu_s - small.cpu_s for small, big in pairs) / extra


def pair_marginals(pairs: list[tuple[Run, Run]]) -> list[float]:
    """Each pair's own marginal CPU seconds per image (their spread shows the noise)."""
    return [marginal([p]) for p in pairs]


#: a peer's job run another way in the same venv: Data-Juicer's op in its one-sample-per-call form
VARIANTS = {"data-juicer-per-sample": "data-juicer"}
LOOP_FOR = {"blip3": "plain loop", "data-juicer": "plain loop", "data-juicer-per-sample": "plain loop",
            "nemo-curator": "plain loop, re-encode"}  # NeMo's writer re-encodes every image


def make_inputs(tmp: Path, sizes: list[int]) -> dict[int, tuple[Path, Path]]:
    """A folder of the largest size's JPEGs and its COCO file, and for each smaller size a folder of
    the first images (hard links) with its own COCO file: every size reads the same bytes."""
    from benchmarks.bench_datagen import make_images

    big = max(sizes)
    folder = tmp / f"images-{big}"
    coco = make_images(folder, big)
    inputs = {big: (folder, coco)}
    data = json.loads(coco.read_text())
    for n in sizes:
        if n == big:
            continue
        sub = tmp / f"images-{n}"
        sub.mkdir()
        keep = data["images"][:n]
        for im in keep:
            os.link(folder / im["file_name"], sub / im["file_name"])
        ids = {im["id"] for im in keep}
        sub_coco = tmp / f"images-{n}.coco.json"
        sub_coco.write_text(json.dumps({**data, "images": keep,
                                        "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
        inputs[n] = (sub, sub_coco)
    return inputs


def versions(tool: str) -> str:
    """The tool's version (and its Ray's, Pillow's) as installed where it runs."""
    code = ("import importlib.metadata as m\nfor d in {dists}:\n"
            "    try: print(d, m.version(d))\n    except m.PackageNotFoundError: pass")
    peer = VARIANTS.get(tool, tool)
    if peer in PEER_TOOLS:
        python = str(PEER_TOOLS[peer].python)
        dists = {"nemo-curator": ["nemo-curator", "cosmos-xenna"], "data-juicer": ["py-data-juicer"]}[peer]
    else:
        python = sys.executable
        dists = ["blip3-engine"] if tool == "blip3" else []
    out = subprocess.run([python, "-c", code.format(dists=[*dists, "ray", "pillow", "pyarrow"])],
                         capture_output=True, text=True).stdout
    found = out.splitlines()
    if tool == "blip3":  # the code measured is this checkout's, whatever the installed metadata says
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        found.insert(0, f"checkout {head.stdout.strip() or 'unknown'}")
    return ", ".join(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,10000", help="two image counts, comma-separated")
    ap.add_argument("--repeat", type=int, default=2, help="(small, large) pairs per tool")
    ap.add_argument("--tools", default="blip3,nemo-curator,data-juicer,data-juicer-per-sample")
    ap.add_argument("--workers", type=int, default=2, help="blip3's --workers; the peers' Ray CPUs")
    ap.add_argument("--setup-only", action="store_true", help="make the peers' venvs, run nothing")
    ap.add_argument("--torch", default=DEFAULT_TORCH, help="pip constraint for torch in the peers' venvs")
    ap.add_argument("--keep", type=Path, help="keep the inputs and the jobs' log (jobs.log) in this folder")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if len(sizes) != 2 or sizes[0] >= sizes[1]:
        ap.error("--sizes takes two different counts, e.g. 2000,10000")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(LOOP_FOR)
    if unknown:
        ap.error(f"unknown tools {sorted(unknown)}; known: {', '.join(LOOP_FOR)}")
    setup_log = VENVS / "install.log"
    VENVS.mkdir(parents=True, exist_ok=True)
    for peer in dict.fromkeys(VARIANTS.get(t, t) for t in tools):
        if peer in PEER_TOOLS:
            ensure_venv(PEER_TOOLS[peer], setup_log, args.torch)
    if args.setup_only:
        return
    from benchmarks._common import report

    loops = sorted({LOOP_FOR[t] for t in tools})
    order = [*loops, *tools]
    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-peers-") if args.keep is None else None
    tmp = Path(tmp_ctx.name) if tmp_ctx else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "jobs.log"
    load = [os.getloadavg()[0]]
    try:
        inputs = make_inputs(tmp, sizes)
        runs: dict[str, list[tuple[Run, Run]]] = {t: [] for t in order}
        # pairs interleaved across tools, so drifting load touches every tool alike
        for r in range(args.repeat):
            for tool in order:
                pair = []
                for n in sizes:
                    folder, coco = inputs[n]
                    out = tmp / f"{tool.replace(' ', '_').replace(',', '')}-{n}-{r}"
                    run = run_job(tool, folder, coco, out, args.workers, log)
                    print(f"  {tool:24s} {n:6d} images: {run.cpu_s:7.1f} CPU s, {run.wall_s:6.1f} wall s"
                          + (f" (killed leftovers: {run.killed})" if run.killed else ""), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    pair.append(run)
                runs[tool].append((pair[0], pair[1]))
        load.append(os.getloadavg()[0])
        per_image = {t: marginal(runs[t]) for t in order}
        rows = []
        for t in order:
            extra = sum(b.images - a.images for a, b in runs[t])
            split = {role: sum(b.cpu_by_role[role] - a.cpu_by_role[role] for a, b in runs[t]) / extra
                     for role in ROLES}
            loop = LOOP_FOR.get(t)
            rows.append({
                "tool": t,
                "CPU s per run (small/large)": ", ".join(f"{a.cpu_s:.1f}/{b.cpu_s:.1f}" for a, b in runs[t]),
                "wall s per run": ", ".join(f"{a.wall_s:.1f}/{b.wall_s:.1f}" for a, b in runs[t]),
                "marginal CPU ms/image (pairs)": f"{per_image[t] * 1e3:.2f} ("
                + ", ".join(f"{m * 1e3:.2f}" for m in pair_marginals(runs[t])) + ")",
                "of which main / Ray workers / other (Ray daemons)":
                    " / ".join(f"{split[role] * 1e3:.2f}" for role in ROLES),
                "vs loop": f"{per_image[t] / per_image[loop]:.2f}x {loop}" if loop else "1.00x",
            })
        path = report("bench_peers", rows, f"the same job, marginal CPU per image over the whole process tree "
                      f"({sizes[0]} -> {sizes[1]} images, {args.repeat} pairs, load average {load[0]:.1f} before, "
                      f"{load[1]:.1f} after)")
        found = {t: versions(t) for t in order}
        for t in order:
            print(f"{t}: {found[t]}")
        path.write_text(json.dumps({
            "argv": sys.argv, "rows": rows, "sizes": sizes, "repeat": args.repeat, "load_average": load,
            "marginal_cpu_ms_per_image": {t: per_image[t] * 1e3 for t in order},
            "vs_loop": {t: per_image[t] / per_image[LOOP_FOR[t]] for t in tools},
            "versions": found, "runs": {t: [[asdict(a), asdict(b)] for a, b in runs[t]] for t in order},
        }, indent=2))
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
