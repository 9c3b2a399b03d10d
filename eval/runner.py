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
from blip3.eval.tasks import Item, Task, draw_shots, get_task

log = get_logger(__name__)

#: Greedy tokens per answer: short answers for VQA / yes-no / a letter, a sentence for captions.
MAX_NEW_TOKENS = {"coco": 20}
DEFAULT_MAX_NEW_TOKENS = 10


@dataclass
class TaskResult:
    task: str
    shots: int
    n: int
    metrics: dict[str, float]
    predictions: Path
    run_id: str | None


def limit_items(items: list[Item], limit: int | None) -> list[Item]:
    """The first `limit` questions; every rotation of a kept MMBench question stays with it."""
    if limit is None:
        return items
    keep: list[str] = []
    for it in items:
        q = it.target.get("question_id", it.id)
        if q not in keep:
            if len(keep) == limit:
                break
            keep.append(q)
    kept = set(keep)
    return [it for it in items if it.target.get("question_id", it.id) in kept]


def read_done(path: Path) -> dict[str, dict]:
    """Rows already written (by id), in `path` and its per-rank siblings; a truncated last line
    from a killed run is dropped."""
    done: dict[str, dict] = {}
    for part in [path, *sorted(path.parent.glob(f"{path.stem}.rank*.jsonl"))]:
        if not part.exists():
            continue
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def _training_run(checkpoint: Path, db) -> str | None:
    """The run that wrote the model: its train_info.json, else the catalog's runs table."""
    info = checkpoint / "train_info.json"
    if info.is_file():
        try:
            run_id = json.loads(info.read_text()).get("run_id")
            if run_id:
                return str(run_id)
        except (json.JSONDecodeError, AttributeError):
            pass
    from blip3.core.catalog import Catalog

    with Catalog(db) as cat:
        return cat.run_for_checkpoint(checkpoint)


class Generator:
    """A model directory's model + processor, answering a batch of prompts greedily."""

    def __init__(self, checkpoint: Path, device: str = "cpu"):
        import torch

        from blip3.model.directory import load_model_dir

        model, self.proc = load_model_dir(checkpoint)
        self.model = model.to(device).eval()
        self.device = device
        self.torch = torch

    def __call__(self, prompts, max_new_tokens: int) -> list[str]:
        encoded = []
        for p in prompts:
            if p.chat:
                encoded.append(self.proc.encode_chat([{"role": "user", "content": p.text}], p.images,
                                                     add_generation_prompt=True))
            else:
                encoded.append(self.proc.encode_prompt(p.text, p.images))
        batch = {k: v.to(self.device) for k, v in self.proc.collate(encoded, padding_side="left").items()}
        eos = [self.proc.tokenizer.eos_token_id, self.proc.end_id, self.proc.end_of_chunk_id]
        with self.torch.inference_mode():
            new = self.model.generate(
                batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("image_sizes"),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=self.proc.pad_id,
            )
        return [self.proc.decode(row) for row in new]


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
    seed: int = 0,
    db=None,
    meteor: bool | None = None,
    dist_info=None,
) -> list[TaskResult]:
    """Evaluate one checkpoint on each task; every input is checked before the model is loaded.

    Under torchrun the questions are split across ranks; only rank 0 returns results. `dist_info`
    (a `model.runtime.DistInfo`) overrides the torchrun environment: a trainer's rank 0
    evaluating alone passes a single-process one."""
    from blip3.model.xgenmm import CONFIG_FILE
    from blip3.model.directory import model_dir
    from blip3.model.runtime import init_distributed

    checkpoint = model_dir(checkpoint)  # a stage output folder means its final/ model
    if not (checkpoint / CONFIG_FILE).is_file():
        raise UserError(f"not a model directory (no {CONFIG_FILE})", field="CHECKPOINT", file=checkpoint)
    if shots < 0:
        raise UserError("must be 0 or more", field="--shots")
    planned: list[tuple[Task, list[Item], list[Item]]] = []
    for name in task_names:
        task = get_task(name)
        if shots and task.zero_shot_only:
            raise UserError(f"{name} is a zero-shot instruct benchmark; run it with --shots 0", field="--shots")
        if name == "coco":
            task.meteor = meteor
        items = limit_items(task.load(data, "test"), limit)
        if not items:
            raise UserError(f"no {name} questions found", file=data / name)
        train = task.load(data, "train") if shots else []
        planned.append((task, items, train))
    info = dist_info or init_distributed()
    if info.distributed:
        device = str(info.device)  # one device per rank
    run_id = _training_run(checkpoint, db) if info.is_main else None
    out.mkdir(parents=True, exist_ok=True)
    generate: Generator | None = None
    results = []
    for task, items, train in planned:
        path = out / f"{task.name}-{shots}shot.jsonl"
        done = read_done(path)
        todo = [it for it in items if it.id not in done][info.rank::info.world_size]
        mine = path.with_name(f"{path.stem}.rank{info.rank}.jsonl") if info.distributed else path
        if todo and generate is None:
            generate = Generator(checkpoint, device)
        max_new = MAX_NEW_TOKENS.get(task.name, DEFAULT_MAX_NEW_TOKENS)
        with mine.open("a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                prompts = [task.prompt(it, draw_shots(train, it, shots, seed)) for it in batch]
                for it, p, text in zip(batch, prompts, generate(prompts, max_new)):
                    row = {"id": it.id, "prompt": p.text, "generated": text, "answer": task.answer(text)}
                    done[it.id] = row
                    f.write(json.dumps(row) + "\n")
                f.flush()
                log.info("%s: %d/%d answered", task.name, len(done), len(items))
        if info.distributed:
            import torch.distributed as dist

            dist.barrier()  # every rank's answers are on disk
            done = read_done(path)
        if info.is_main:
            results.append(_finish(task, items, done, shots, checkpoint, path, run_id, db))
    return results


def _finish(task: Task, items: list[Item], done: dict[str, dict], shots: int, checkpoint: Path, path: Path,
            run_id: str | None, db) -> TaskResult:
    """Score a complete task, write its per-sample parquet, record its metrics in the catalog."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blip3.core.catalog import Catalog

    answers = {it.id: done[it.id]["answer"] for it in items}
    metrics = task.score(items, answers)
    rows = [{"id": it.id, "prompt": done[it.id]["prompt"], "generated": done[it.id]["generated"],
             "answer": answers[it.id], "score": task.score_item(it, answers[it.id])} for it in items]
    parquet = path.with_suffix(".parquet")
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("generated", pa.string()),
                        ("answer", pa.string()), ("score", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), parquet)
    with Catalog(db) as cat:
        cat.record_eval(checkpoint=checkpoint, task=task.name, shots=shots, metrics=metrics, n=len(items),
                        run_id=run_id, predictions_path=parquet)
    return TaskResult(task.name, shots, len(items), metrics, parquet, run_id)
