"""Run benchmarks on a model directory: batched greedy generation, resumable, recorded in the catalog.

Predictions are appended to `<out>/<task>-<shots>shot.jsonl` after every batch, so a killed run
continues where it stopped (items already answered are skipped; a half-written last line is
ignored). Under torchrun each rank answers every world_size-th remaining question into its own
`...shot.rank<R>.jsonl`; rank 0 waits for all, then scores and records. When a task is complete
its per-sample table goes to a parquet file beside it and its metrics to the catalog's `evals`
table, linked to the training run that wrote the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from blip3.core.errors import UserError
from blip3.core.logs import get_logger
from blip3.eval.protocols import OFFICIAL, Protocol, check_tasks, get_protocol
from blip3.eval.tasks import Item, Prompt, Task, draw_shots, get_task, mark_duplicates, query_set

log = get_logger(__name__)

#: Caption tasks: pycocoevalcap scores them, and its tokenizer needs Java.
CAPTION_TASKS = ("coco", "textcaps", "nocaps")


@dataclass
class TaskResult:
    task: str
    shots: int
    n: int
    metrics: dict[str, float]
    predictions: Path
    run_id: str | None
    failed: int = 0


def limit_items(items: list[Item], limit: int | None, task: Task | None = None) -> list[Item]:
    """The first `limit` questions; every circular pass of a kept MMBench question stays with it."""
    if limit is None:
        return items
    group = task.group if task is not None else (lambda it: it.id)
    keep: dict[str, None] = {}
    for it in items:
        g = group(it)
        if g not in keep:
            if len(keep) == limit:
                break
            keep[g] = None
    return [it for it in items if group(it) in keep]


def read_done(path: Path) -> dict[str, dict]:
    """Rows already written (by id), in `path` and its per-rank siblings; a truncated last line
    from a killed run is dropped. A row with an `error` (an image that could not be read) is
    kept as such; a re-run asks that question again."""
    done: dict[str, dict] = {}
    for part in [path, *sorted(path.parent.glob(f"{path.stem}.rank*.jsonl"))]:
        if not part.exists():
            continue
        for line in part.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                done[str(row["id"])] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def _training_run(checkpoint: Path, db) -> str | None:
    """The run that wrote the model: its train_info.json, else the catalog's runs table. A
    train_info.json that cannot be read is said in one warning line, and the catalog is asked."""
    info = checkpoint / "train_info.json"
    if info.is_file():
        try:
            data = json.loads(info.read_text(encoding="utf-8"))
            run_id = data.get("run_id") if isinstance(data, dict) else None
            if run_id:
                return str(run_id)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, OSError) as e:
            log.warning("%s: not a readable train_info.json (%s); the run is looked up in the catalog",
                        info, type(e).__name__)
    from blip3.core.catalog import Catalog

    with Catalog(db) as cat:
        return cat.run_for_checkpoint(checkpoint)


def check_finite(model, checkpoint: Path) -> None:
    """A model with NaN or infinite weights is refused before it answers anything: its answers
    would be noise recorded as a score."""
    import torch

    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"{len(bad)} weight tensors hold NaN or infinite values (first: {bad[0]}); "
                        "not evaluated", field="CHECKPOINT", file=checkpoint)


class Generator:
    """A model directory's model + processor, answering a batch of prompts (greedy, or beam search
    when the protocol says so)."""

    def __init__(self, checkpoint: Path, device: str = "cpu"):
        import torch

        from blip3.model.directory import load_model_dir

        model, self.proc = load_model_dir(checkpoint)
        check_finite(model, checkpoint)
        self.model = model.to(device).eval()
        self.device = device
        self.torch = torch

    def __call__(self, prompts: list[Prompt], max_new_tokens: int, num_beams: int = 1,
                 length_penalty: float = 1.0) -> list[str]:
        encoded = []
        for p in prompts:
            if p.chat:
                encoded.append(self.proc.encode_chat([{"role": "user", "content": p.text}], p.images,
                                                     add_generation_prompt=True))
            else:
                encoded.append(self.proc.encode_prompt(p.text, p.images))
        batch = {k: v.to(self.device) for k, v in self.proc.collate(encoded, padding_side="left").items()}
        eos = [self.proc.tokenizer.eos_token_id, self.proc.end_id, self.proc.end_of_chunk_id]
        beams = {"num_beams": num_beams, "length_penalty": length_penalty} if num_beams > 1 else {}
        with self.torch.inference_mode():
            new = self.model.generate(
                batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("image_sizes"),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=self.proc.pad_id, **beams,
            )
        return [self.proc.decode(row) for row in new]


@dataclass
class Plan:
    task: Task
    items: list[Item]  # failed ones included: they become failed rows
    pool: list[Item]  # where in-context examples come from


def plan_task(name: str, protocol: Protocol, data: Path, shots: int, limit: int | None, seed: int) -> Plan:
    """Everything read and checked before a model is loaded or a token generated."""
    task = get_task(name, protocol)
    if task.protocols is not None and protocol.name not in task.protocols:
        raise UserError(f"{name} is defined under --protocol {' or '.join(task.protocols)}", field="--protocol")
    if shots and task.zero_shot_only:
        raise UserError(f"{name} is a zero-shot instruct benchmark; run it with --shots 0", field="--shots")
    everything = mark_duplicates(task.load(data, "test"))
    items = limit_items(everything, limit, task)
    if not [it for it in items if it.error is None]:
        reason = f" (first failure: {items[0].error})" if items else ""
        raise UserError(f"no {name} questions that can be asked{reason}", file=data / name)
    k = shots or protocol.zero_shot_text_examples
    pool = query_set(task.load(data, "train"), protocol.query_set_size, seed, len(everything)) if k else []
    if k and len(pool) < k:
        raise UserError(f"{k} in-context examples need at least {k} usable train questions, {name} has {len(pool)}",
                        field="--shots")
    return Plan(task, items, pool)


def evaluate(
    checkpoint: Path,
    task_names: list[str],
    *,
    data: Path,
    out: Path,
    shots: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int | None = None,
    db=None,
    meteor: bool | None = None,
    dist_info=None,
    protocol: str | Protocol = OFFICIAL,
    judge: Path | None = None,
) -> list[TaskResult]:
    """Evaluate one checkpoint on each task; every input is checked before the model is loaded.

    `protocol` names the preset of eval/protocols.py; `seed` defaults to its own. `judge` is a
    local causal LM that reads MMBench answers exact matching cannot (vlmevalkit protocol).
    Under torchrun the questions are split across ranks; only rank 0 returns results. `dist_info`
    (a `model.runtime.DistInfo`) overrides the torchrun environment: a trainer's rank 0
    evaluating alone passes a single-process one."""
    from blip3.model.xgenmm import CONFIG_FILE
    from blip3.model.directory import model_dir
    from blip3.model.runtime import init_distributed

    proto = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
    checkpoint = model_dir(checkpoint)  # a stage output folder means its final/ model
    if not (checkpoint / CONFIG_FILE).is_file():
        raise UserError(f"not a model directory (no {CONFIG_FILE})", field="CHECKPOINT", file=checkpoint)
    if shots < 0:
        raise UserError("must be 0 or more", field="--shots")
    check_tasks(proto, task_names)
    if judge is not None and proto.name != "vlmevalkit":
        raise UserError("an answer judge is part of the vlmevalkit protocol; add --protocol vlmevalkit", field="--judge")
    seed = proto.seed if seed is None else seed
    if any(name in CAPTION_TASKS for name in task_names):
        from blip3.eval.metrics import require_java

        require_java("captioning")
    planned = []
    for name in task_names:
        plan = plan_task(name, proto, data, shots, limit, seed)
        if name in CAPTION_TASKS:
            plan.task.meteor = meteor
        planned.append(plan)
    if judge is not None:
        from blip3.eval.judge import Judge

        shared = Judge(judge, device)
        for plan in planned:
            if hasattr(plan.task, "judge"):
                plan.task.judge = shared
    info = dist_info or init_distributed()
    if info.distributed:
        device = str(info.device)  # one device per rank
    run_id = _training_run(checkpoint, db) if info.is_main else None
    out.mkdir(parents=True, exist_ok=True)
    generate: Generator | None = None
    results = []
    for plan in planned:
        task, items = plan.task, plan.items
        path = out / f"{task.name}-{shots}shot{'' if proto is OFFICIAL else '.' + proto.name}.jsonl"
        done = read_done(path)
        asked = [it for it in items if it.error is None]
        todo = [it for it in asked if it.id not in done or "error" in done[it.id]][info.rank::info.world_size]
        mine = path.with_name(f"{path.stem}.rank{info.rank}.jsonl") if info.distributed else path
        if todo and generate is None:
            generate = Generator(checkpoint, device)
        k = shots or proto.zero_shot_text_examples
        with mine.open("a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch, prompts, rows = [], [], []
                for it in todo[start:start + batch_size]:
                    try:
                        prompts.append(task.prompt(it, draw_shots(plan.pool, it, k, seed), text_only_shots=not shots))
                        batch.append(it)
                    except UserError as e:  # an image that cannot be read: this question fails, the run goes on
                        rows.append({"id": it.id, "error": str(e)})
                if batch:
                    texts = generate(prompts, proto.new_tokens(task.name), proto.num_beams, proto.length_penalty)
                    rows += [{"id": it.id, "prompt": p.text, "generated": t, "answer": task.answer(t)}
                             for it, p, t in zip(batch, prompts, texts)]
                for row in rows:
                    done[row["id"]] = row
                    f.write(json.dumps(row) + "\n")
                f.flush()
                log.info("%s: %d/%d answered", task.name, len(done), len(asked))
        if info.distributed:
            import torch.distributed as dist

            dist.barrier()  # every rank's answers are on disk
            done = read_done(path)
        if info.is_main:
            label = task.name if proto is OFFICIAL else f"{task.name}@{proto.name}"
            results.append(_finish(task, label, items, done, shots, checkpoint, path, run_id, db))
    return results


def _finish(task: Task, label: str, items: list[Item], done: dict[str, dict], shots: int, checkpoint: Path,
            path: Path, run_id: str | None, db) -> TaskResult:
    """Score a complete task, write its per-sample parquet (failed rows with their reason), and
    record its metrics (with `failed`, the count of questions not scored) in the catalog under
    `label` (the task, with `@protocol` unless the protocol is the official one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blip3.core.catalog import Catalog

    errors = {id(it): it.error or done.get(it.id, {"error": "no answer was recorded"}).get("error") for it in items}
    # a question of several items (MMBench's circular passes) is scored whole or not at all
    broken = {task.group(it): errors[id(it)] for it in items if errors[id(it)] is not None and it.error is None}
    for it in items:
        if errors[id(it)] is None and task.group(it) in broken:
            errors[id(it)] = f"another item of question {task.group(it)} failed: {broken[task.group(it)]}"
    scored = [it for it in items if errors[id(it)] is None]
    if not scored:
        raise UserError(f"no {task.name} question could be scored (first failure: {errors[id(items[0])]})", file=path)
    answers = {it.id: done[it.id]["answer"] for it in scored}
    metrics = task.score(scored, answers)
    rows = []
    for it in items:
        row = done.get(it.id, {}) if errors[id(it)] is None else {}
        rows.append({"id": it.id, "prompt": row.get("prompt"), "generated": row.get("generated"),
                     "answer": row.get("answer"), "score": task.score_item(it, answers[it.id]) if row else None,
                     "error": errors[id(it)]})
    n_failed = len(items) - len(scored)
    if n_failed:
        metrics["failed"] = float(n_failed)
        log.warning("%s: %d of %d questions failed and are not scored (reasons in %s); first: %s", task.name,
                    n_failed, len(items), path.with_suffix(".parquet").name,
                    next(e for e in errors.values() if e is not None))
    parquet = path.with_suffix(".parquet")
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("generated", pa.string()),
                        ("answer", pa.string()), ("score", pa.float64()), ("error", pa.string())])
    tmp = parquet.with_name(parquet.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    tmp.replace(parquet)  # the parquet appears whole
    with Catalog(db) as cat:
        cat.record_eval(checkpoint=checkpoint, task=label, shots=shots, metrics=metrics, n=len(scored),
                        run_id=run_id, predictions_path=parquet)
    return TaskResult(task.name, shots, len(scored), metrics, parquet, run_id, n_failed)
