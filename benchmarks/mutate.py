"""Mutation testing (`make mutate`): how many deliberate bugs the tests catch, per module.

A test suite can pass while asserting little; breaking the code on purpose and counting the
breaks the tests notice is the honest measure. For each module below:

1. the tracked tree is copied to a scratch folder, so a mutant never touches the checkout (an
   interrupted run leaves nothing behind), and `blip3` is made to import from that copy;
2. cosmic-ray mutates the module in place there, one mutation at a time, and runs the module's
   targeted tests (`MODULES`) after each; a failing (or hanging) test run kills the mutant. The
   test runs go through a fork server (`benchmarks/mutate_forkserver.py`) that imported torch and
   the other heavy libraries once, without pytest's plugin autoload: start-up, not the tests,
   is most of a small module's run;
3. the kill rate per module goes to `benchmarks/results/mutation.md` (and `.json`), with the
   surviving mutants listed (file:line, operator) so each is killed by a new test or explained
   as equivalent in docs/testing.md.

The operator set is trimmed to the mutants a reviewer would call real bugs (see `EXCLUDE`):
cosmic-ray's full set replaces every binary operator by every other one (`a + b` -> `a << b`),
which multiplies the run time without finding more weak tests.

Slow and CPU-bound (one pytest per mutant): not in CI. Run it niced, one at a time:

    nice -n 19 python -m benchmarks.mutate core/shards.py core/sql.py
    nice -n 19 python -m benchmarks.mutate --all            # every module below
    nice -n 19 python -m benchmarks.mutate core/shards.py --budget-min 20   # a random sample in 20 min
    nice -n 19 python -m benchmarks.mutate model/anyres.py --tests tests/test_model_anyres.py  # "before"
    nice -n 19 python -m benchmarks.mutate --recheck model/anyres.py        # survivors vs today's tests
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

#: Module -> the tests that guard it (fast ones; `--slow` adds the Ray/CLI end-to-end tests too).
MODULES: dict[str, list[str]] = {
    "core/shards.py": ["tests/test_mut_shards.py", "tests/test_mut_shards_remote.py", "tests/test_core_shards.py",
                       "tests/test_bite_shards.py"],
    "core/sql.py": ["tests/test_mut_sql.py", "tests/test_bite_sql.py", "tests/test_core_catalog.py::test_sql_refuses_writes",
                    "tests/test_core_catalog.py::test_sql_error_is_one_clear_line"],
    "core/catalog.py": ["tests/test_mut_catalog.py", "tests/test_core_transaction.py",
                        *(f"tests/test_core_catalog.py::test_{t}" for t in (
                            "add_twice_is_idempotent", "changed_shard_is_flagged",
                            "reregistering_a_shard_replaces_its_rows_through_the_shard_index",
                            "add_rejects_folder_without_shards", "add_counts_a_folder_of_stats_less_tars_in_its_error",
                            "catalog_from_before_the_img2dataset_names_is_migrated",
                            "queries_still_read_the_catalog_with_its_views")),
                        *(f"tests/test_catalog_batches.py::test_{t}" for t in (
                            "shards_are_inserted_one_batch_per_statement", "a_corrupt_sidecar_fails_alone_in_its_batch",
                            "reregistering_a_batch_replaces_its_rows", "registrar_writes_each_batch_when_it_fills",
                            "registrar_keeps_a_batch_while_the_catalog_is_locked")),
                        *(f"tests/test_mixture_catalog.py::test_{t}" for t in (
                            "wrong_kind_is_refused_before_anything_is_written",
                            "failed_first_foreign_add_leaves_no_rows_of_earlier_shards",
                            "foreign_webdataset_shards_become_a_source")),
                        "tests/test_eval_plot.py::test_one_plot_per_task_with_results_and_on_the_report",
                        "tests/test_core_catalog_owner.py::test_mix_build_records_the_mixture_through_the_catalog_in_the_env_db",
                        *(f"tests/test_core_catalog.py::test_{t}" for t in (  # through the CLI: slower, last
                            "add_with_a_corrupt_sidecar_registers_the_good_shards_and_exits_non_zero",
                            "db_that_is_not_duckdb_is_one_line", "catalog_locked_by_another_process_waits_then_says_so"))],
    "datagen/ocr_captions.py": ["tests/test_ocr_captions.py", "tests/test_bite_datagen.py"],
    "datagen/grounding_captions.py": ["tests/test_grounding_captions.py", "tests/test_mut_grounding_captions.py"],
    "datagen/images.py": ["tests/test_mut_datagen_images.py", "tests/test_datagen_images.py", "tests/test_bite_datagen.py"],
    "datagen/pipeline.py": ["tests/test_mut_datagen_pipeline.py", "tests/test_datagen_pipeline.py",
                            "tests/test_catalog_batches.py::test_job_registers_finished_shards_batch_by_batch",
                            "tests/test_datagen_scale.py::test_worker_killed_mid_shard_is_retried_to_the_same_bytes"],
    "mixture/loader.py": ["tests/test_mut_mixture_loader.py", "tests/test_mixture_loader.py", "tests/test_bite_mixture.py"],
    # the manifest tests but the one through a `blip3` subprocess, the catalog tests that read a built mixture
    "mixture/build.py": ["tests/test_mut_mixture_build.py", "tests/test_bite_mixture.py"] + [
        f"tests/test_mixture_manifest.py::{t}" for t in (
            "test_manifest_round_trip", "test_plan_by_samples_default_target_is_one_pass_of_the_heaviest",
            "test_plan_by_tokens_matches_token_shares", "test_malformed_source_entry_names_field_and_file",
            "test_malformed_top_level_fields", "test_unknown_source_is_named", "test_unknown_source_without_a_catalog",
            "test_build_refuses_sources_counted_with_other_vision_tokens_per_image", "test_moved_shard_is_a_clear_error",
            "test_changed_shard_is_caught_by_checksum", "test_every_shipped_spec_validates",
            "test_shipped_tiny_mixtures_build_and_run", "test_xgenmm_stage1_spec_builds_over_catalogued_sources",
            "test_size_only_verification_skips_hashing_but_still_catches_moves",
            "test_inline_folder_uses_only_finished_shards")] + [
        "tests/test_mixture_catalog.py::test_mixture_views_answer",
        "tests/test_mixture_catalog.py::test_recorded_mixture_has_the_manifest_created_at"],
    "model/xgenmm.py": ["tests/test_mut_model_xgenmm.py", "tests/test_model_xgenmm.py", "tests/test_bite_model.py"],
    "model/resampler.py": ["tests/test_mut_model_resampler.py", "tests/test_model_resampler.py"],
    "model/anyres.py": ["tests/test_mut_model_anyres.py", "tests/test_model_anyres.py"],
    "train/dpo.py": ["tests/test_mut_train_dpo.py", "tests/test_train_dpo.py"],
    "train/loop.py": ["tests/test_mut_train_loop.py", "tests/test_train_units.py::test_token_budget_becomes_steps",
                      "tests/test_train_guards.py",
                      "tests/test_train_objective.py::test_micro_batch_4_equals_2_x_accumulation_2",
                      "tests/test_train_objective.py::test_the_trainer_does_not_generate_data",
                      "tests/test_train_objective.py::test_a_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint",
                      "tests/test_train_resume.py::test_stored_loss_curve[plain]",
                      "tests/test_train_resume.py::test_interrupt_and_resume_is_exact[pretrain-k3]",
                      "tests/test_eval_run.py::test_stage_benchmarks_run_at_its_end_and_join_its_mixture"],
    "train/checkpoint.py": ["tests/test_mut_train_checkpoint.py", "tests/test_train_checkpoint.py",
                            "tests/test_train_units.py::test_checkpoint_round_trip_and_keep", "tests/test_train_resume.py"],
}

#: Binary-operator swaps kept: the ones a slip of the hand makes (sign, scale, integer division).
_KEPT_BINARY = "Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Div_FloorDiv|Mod_FloorDiv|Pow_Mul"
#: Comparison swaps kept: negations and off-by-one boundaries.
_KEPT_COMPARE = ("Eq_NotEq|NotEq_Eq|Lt_GtE|Gt_LtE|LtE_Gt|GtE_Lt|Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Is_IsNot|IsNot_Is"
                 "|In_NotIn|NotIn_In")
EXCLUDE = [
    rf"core/ReplaceBinaryOperator_(?!({_KEPT_BINARY})$)",
    rf"core/ReplaceComparisonOperator_(?!({_KEPT_COMPARE})$)",
    r"core/ReplaceUnaryOperator_",
    r"core/VariableReplacer",
    r"core/VariableInserter",
    r"core/RemoveDecorator",  # @dataclass/@property removal breaks import: counted, never informative
]


def _copy_tree(dest: Path) -> Path:
    """Tracked + untracked-not-ignored files of the checkout into `dest/src`; returns that folder."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    src = dest / "src"
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    links = dest / "links"
    links.mkdir()
    (links / "blip3").symlink_to(src, target_is_directory=True)  # the package maps `blip3` to the root
    return src


def _test_env(scratch: Path) -> dict[str, str]:
    """The environment of every test run: `blip3` from the scratch copy, and no pytest plugins
    loaded from entry points (anyio's, hypothesis', platformdirs' together cost ~5 s of start-up per
    run, 3-4x the run of a small module's tests; the tests need none of them)."""
    env = dict(os.environ, PYTHONPATH=str(scratch / "links"), BLIP3_NO_PROGRESS="1", PYTHONDONTWRITEBYTECODE="1",
               RAY_TMPDIR=str(scratch / "ray"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    os.makedirs(env["RAY_TMPDIR"], exist_ok=True)
    return env


def _run_module(module: str, tests: list[str], scratch: Path, slow: bool, budget_min: float | None = None) -> dict:
    commit = _commit(module)  # now, with the copy: the checkout may move on during a long run
    src = _copy_tree(scratch)
    env = _test_env(scratch)
    marker = [] if slow else ["-m", "not slow"]
    pytest_args = ["-x", "-q", "-p", "no:cacheprovider", *marker, *tests]
    t0 = time.perf_counter()
    base = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=src, env=env, capture_output=True,
                          text=True)
    baseline_s = time.perf_counter() - t0
    if base.returncode != 0:
        return {"module": module, "error": "baseline tests fail", "output": base.stdout[-2000:]}
    with _forkserver(scratch, env) as run_cmd:
        test_cmd = [*run_cmd, *pytest_args]
        if subprocess.run(test_cmd, cwd=src, env=env).returncode != 0:  # the server runs the same tests alike
            return {"module": module, "error": "baseline tests fail through the fork server"}
        _init_exec(module, scratch, src, env, test_cmd, baseline_s, budget_min)
    session = scratch / "session.sqlite"
    summary = _summarise(module, session, src)
    summary.update(baseline_s=round(baseline_s, 1), tests=tests, minutes=round((time.perf_counter() - t0) / 60, 1),
                   commit=commit)
    return summary


@contextlib.contextmanager
def _forkserver(scratch: Path, env: dict) -> Iterator[list[str]]:
    """Start `benchmarks/mutate_forkserver.py` for one module; yields the command prefix that runs
    pytest through it (`... run SOCKET --`)."""
    sock = scratch / "pytest.sock"
    script = str(REPO / "benchmarks" / "mutate_forkserver.py")
    server = subprocess.Popen([sys.executable, script, "serve", str(sock)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not sock.exists():
            if server.poll() is not None:
                raise RuntimeError("the pytest fork server did not start")
            time.sleep(0.2)
        yield [sys.executable, script, "run", str(sock), "--"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


def _init_exec(module: str, scratch: Path, src: Path, env: dict, test_cmd: list[str], baseline_s: float,
               budget_min: float | None) -> None:
    config = scratch / "cosmic-ray.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(module)}\n"
        f"timeout = {max(60.0, 4 * baseline_s):.0f}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(shlex.join(test_cmd))}\n"
        "[cosmic-ray.distributor]\nname = \"local\"\n"
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = {json.dumps(EXCLUDE)}\n"
    )
    session = scratch / "session.sqlite"
    bindir = Path(sys.executable).parent
    for cmd in (["cosmic-ray", "init", str(config), str(session)],
                ["cr-filter-operators", str(session), str(config)]):
        subprocess.run([str(bindir / cmd[0]), *cmd[1:]], cwd=src, env=env, check=True, capture_output=True)
    pristine = (src / module).read_text()
    _exec(bindir, config, session, src, env, budget_min)
    (src / module).write_text(pristine)  # a run stopped by the budget may leave its last mutant applied


def _exec(bindir: Path, config: Path, session: Path, src: Path, env: dict, budget_min: float | None) -> None:
    """`cosmic-ray exec`, stopped after `budget_min` minutes if given (with its test runs: it gets its
    own process group). cosmic-ray takes the pending mutants in random order, so a stopped run's
    finished mutants are a random sample of the module's; the summary says how many ran."""
    proc = subprocess.Popen([str(bindir / "cosmic-ray"), "exec", str(config), str(session)], cwd=src, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=None if budget_min is None else budget_min * 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return
    if rc != 0:
        raise subprocess.CalledProcessError(rc, proc.args)


def _commit(module: str) -> str:
    """The commit measured, `+dirty` when the module differs from it (results are of that code)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", module], cwd=REPO).returncode != 0
    return head + ("+dirty" if dirty else "")


def _mutations(session: Path, lines: list[str]) -> dict[tuple[str, str], list]:
    """(operator, stripped line) -> that line's mutation specs of the operator, in occurrence order:
    a mutant's identity that survives edits elsewhere in the file (occurrence numbers do not)."""
    from cosmic_ray.work_db import WorkDB, use_db

    found: dict[tuple[str, str], list] = {}
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in db.work_items:
            m = item.mutations[0]
            found.setdefault((m.operator_name, lines[m.start_pos[0] - 1].strip()), []).append(m)
    for specs in found.values():
        specs.sort(key=lambda m: m.occurrence)
    return found


def _summarise(module: str, session: Path, src: Path) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db

    outcomes: Counter[str] = Counter()
    survivors = []
    lines = (src / module).read_text().splitlines()
    same_line = _mutations(session, lines)
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome.value == "skipped":  # left out by the operator filter
                continue
            outcome = (result.test_outcome or result.worker_outcome).value
            outcomes[outcome] += 1
            if outcome == "survived":
                m = item.mutations[0]
                code = lines[m.start_pos[0] - 1].strip()
                rank = [x.occurrence for x in same_line[(m.operator_name, code)]].index(m.occurrence)
                survivors.append({"line": m.start_pos[0], "operator": m.operator_name.removeprefix("core/"),
                                  "occurrence": m.occurrence, "rank": rank, "code": code})
        not_run = sum(1 for _ in db.pending_work_items)
    # incompetent mutants (the module no longer imports) are killed by any test run: count them killed
    total = sum(outcomes.values())
    killed = outcomes["killed"] + outcomes["incompetent"]
    return {"module": module, "mutants": total, "not_run": not_run, "killed": killed, "survived": outcomes["survived"],
            "kill_rate": round(100 * killed / total, 1) if total else None,
            "survivors": sorted(survivors, key=lambda s: (s["line"], s["operator"], s["rank"]))}


def _recheck(module: str, scratch: Path, slow: bool) -> dict:
    """Re-run the recorded survivors of `module` against today's tests (after new tests were added).

    Each survivor is found again in today's file by operator, line text and rank on that line (the
    file may have changed elsewhere), applied alone (`cosmic-ray apply`) to a fresh copy, and the
    tests run once. A survivor whose line is gone no longer exists and leaves the count."""
    previous = {r["module"]: r for r in json.loads((RESULTS / "mutation.json").read_text())}[module]
    bindir = Path(sys.executable).parent
    commit = _commit(module)
    src = _copy_tree(scratch)
    env = _test_env(scratch)
    config = scratch / "cosmic-ray.toml"
    config.write_text(f"[cosmic-ray]\nmodule-path = {json.dumps(module)}\ntimeout = 600\nexcluded-modules = []\n"
                      "test-command = \"true\"\n[cosmic-ray.distributor]\nname = \"local\"\n")
    session = scratch / "recheck.sqlite"
    subprocess.run([str(bindir / "cosmic-ray"), "init", str(config), str(session)], cwd=src, env=env, check=True,
                   capture_output=True)
    pristine = (src / module).read_text()
    today = _mutations(session, pristine.splitlines())
    marker = [] if slow else ["-m", "not slow"]
    still, gone = [], 0
    with _forkserver(scratch, env) as run_cmd:
        for s in previous["survivors"]:
            specs = today.get((f"core/{s['operator']}", s["code"]), [])
            if s["rank"] >= len(specs):
                gone += 1
                continue
            subprocess.run([str(bindir / "cosmic-ray"), "apply", module, f"core/{s['operator']}",
                            str(specs[s["rank"]].occurrence)], cwd=src, env=env, check=True, capture_output=True)
            try:
                rc = subprocess.run([*run_cmd, "-x", "-q", "-p", "no:cacheprovider", *marker, *MODULES[module]],
                                    cwd=src, env=env, capture_output=True, timeout=600).returncode
            except subprocess.TimeoutExpired:  # a hang is a kill, as in the full run
                rc = -1
            (src / module).write_text(pristine)
            if rc == 0:
                still.append(s)
    mutants = previous["mutants"] - gone
    killed = mutants - len(still)
    return {**previous, "mutants": mutants, "killed": killed, "survived": len(still), "survivors": still,
            "tests": MODULES[module],
            "rechecked_at": commit,
            "kill_rate_before": previous.get("kill_rate_before", previous["kill_rate"]),
            "kill_rate": round(100 * killed / mutants, 1)}


def _write(results: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mutation.json"
    old = {r["module"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    old.update({r["module"]: r for r in results})
    merged = [old[m] for m in sorted(old)]
    path.write_text(json.dumps(merged, indent=2))
    rows = ["| module | commit | mutants | killed | survived | kill rate before | kill rate after | tests (s) | run (min) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in merged:
        if "error" in r:
            rows.append(f"| {r['module']} | {r.get('commit', '-')} | - | - | - | {r['error']} | - | - | - |")
            continue
        before = r.get("kill_rate_before", r["kill_rate"])
        mutants = f"{r['mutants']} of {r['mutants'] + r['not_run']}" if r.get("not_run") else r["mutants"]
        rows.append(f"| {r['module']} | {r.get('commit', '-')} | {mutants} | {r['killed']} | {r['survived']} "
                    f"| {before}% | {r['kill_rate']}% | {r['baseline_s']} | {r['minutes']} |")
    rows.append("")
    for r in merged:
        for s in r.get("survivors", []):
            rows.append(f"- survived {r['module']}:{s['line']} {s['operator']} #{s['occurrence']}: `{s['code'][:100]}`")
    md = RESULTS / "mutation.md"
    md.write_text("\n".join(rows) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="Module paths (default with --all: every module in MODULES).")
    ap.add_argument("--all", action="store_true", help="Run every module in MODULES.")
    ap.add_argument("--slow", action="store_true", help="Include the slow (Ray, end-to-end) tests.")
    ap.add_argument("--budget-min", type=float, metavar="MIN",
                    help="Stop each module's run after MIN minutes and report the mutants run so far "
                         "(a random sample of the module's).")
    ap.add_argument("--tests", nargs="+", metavar="TEST",
                    help="Run these tests instead of the module's in MODULES (e.g. the tests before a change, "
                         "for a 'before' figure); one module only.")
    ap.add_argument("--recheck", action="store_true",
                    help="Only re-test the survivors recorded in benchmarks/results/mutation.json (after adding tests).")
    args = ap.parse_args(argv)
    modules = list(MODULES) if args.all else args.modules
    unknown = [m for m in modules if m not in MODULES]
    if not modules or unknown:
        ap.error(f"name modules from: {', '.join(MODULES)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if args.tests and (len(modules) != 1 or args.recheck):
        ap.error("--tests takes one module and no --recheck")
    for module in modules:
        with tempfile.TemporaryDirectory(prefix="blip3-mutate-") as tmp:
            if args.recheck:
                result = _recheck(module, Path(tmp), args.slow)
            else:
                result = _run_module(module, args.tests or MODULES[module], Path(tmp), args.slow, args.budget_min)
        md = _write([result])
        rate = result.get("kill_rate", result.get("error"))
        print(f"{module}: {result.get('killed')}/{result.get('mutants')} killed ({rate}) -> {md}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
