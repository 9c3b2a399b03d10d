"""Stage and pipeline configuration: YAML -> dataclasses, validated before any work starts.

A stage file names everything one training stage needs (kind, init, model, data, what trains,
LoRA, optimiser and schedule, batch and sequence sizes, any-res, length, cadence, output dir).
A pipeline file lists stage files; each stage's final checkpoint is the next stage's init.

Every mistake is reported as one `UserError` naming the field (dotted path) and the file.
Paths: `data.*` (recipe files shipped beside the stage) are relative to the stage file's folder;
`output_dir` and `init.path` (run outputs) are relative to the working directory, like any
command's output. In a pipeline, each stage after the first starts from the previous stage's
`final/` model, whatever its own `init.path` says (that one serves for running it alone).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip3.core.errors import UserError
from blip3.core.yamlio import read_yaml

STAGE_KINDS = ("pretrain", "sft", "interleave", "dpo", "safety")
#: Stages that train LoRA adapters on the LLM by default (the paper's post-training).
LORA_KINDS = ("dpo", "safety")
#: peft target pattern hitting Phi-3's projections inside the LLM only (not the resampler).
DEFAULT_LORA_TARGETS = r".*lang_model.*\.(qkv_proj|o_proj|gate_up_proj|down_proj)"
MODULE_GROUPS = ("vision_encoder", "vision_tokenizer", "lang_model")


@dataclass
class InitConfig:
    """Where the weights come from: a saved model dir, else the `model` preset built from scratch."""

    path: str | None = None  # a model dir (save_pretrained) or a stage output dir
    seed: int = 0  # for from-scratch initialisation


@dataclass
class DataConfig:
    """The mixture: a built manifest, or a mixture spec built at stage start (see mixture.build)."""

    manifest: str | None = None
    spec: str | None = None
    generate: str | None = None  # "tiny": the CLI writes the tiny synthetic shards before the first stage
    shuffle_buffer: int = 1000
    num_workers: int = 0  # DataLoader processes that read, decode and encode samples (0: the training thread)


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = DEFAULT_LORA_TARGETS
    merge: bool = False  # merge adapters into the weights of the saved output


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class BatchConfig:
    micro_batch_size: int = 1  # sequences per forward, per rank
    grad_accum: int = 1
    seq_len: int = 2048  # text budget per sequence (packed length in pretrain)
    pack: bool = False  # concatenate short samples into one sequence (segment_ids)


@dataclass
class DpoConfig:
    beta: float = 0.1
    # Add pairs whose rejected side is the CHOSEN answer given a noised image. Not the paper's
    # noised-image negative (the model's own answer on a noised image), which needs generation
    # during training; the name says which one this is.
    noised_image_chosen_as_rejected: bool = False
    noise_std: float = 1.0


@dataclass
class RuntimeConfig:
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = True  # under torchrun with world_size > 1
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    loss: str = "chunked"  # chunked: log-probs chunk by chunk, never the full fp32 logits | dense
    # dense: SDPA, packed rows with a (T, T) mask | flex: FlexAttention with a block mask from the
    # packed segments (GPU for training: torch has no FlexAttention backward on CPU)
    attention: str = "dense"
    # a stage starting from a model dir builds it on the meta device and loads the weights into
    # the (sharded) parameters after parallelism is applied; false: load it whole first
    meta_init: bool = True
    # FSDP2 (several ranks): the dtype the ranks reduce gradients in (fp32: sums of many bf16
    # gradients lose bits), and whether a block's gathered parameters are freed after its forward
    # (true: less memory, one more all-gather in backward; false: the ZeRO-2 trade)
    reduce_dtype: str = "fp32"  # fp32 | bf16
    reshard_after_forward: bool = True


@dataclass
class BenchmarkConfig:
    """`blip3 eval` tasks run on the stage's final model, recorded in the catalog with its run."""

    tasks: list[str] = field(default_factory=list)  # vqav2, okvqa, textvqa, coco, pope, mmbench
    data: str | None = None  # benchmark folder (relative to this file); default $BLIP3_EVAL_DATA or ./eval-data
    shots: int = 0
    limit: int | None = None  # the first N questions of each task
    batch_size: int = 8


@dataclass
class StageConfig:
    """One training stage, as written in a stage YAML."""

    stage: str
    name: str
    output_dir: str
    init: InitConfig = field(default_factory=InitConfig)
    model: str | None = None  # model.config preset ("tiny", "phi3-mini") for a from-scratch init
    data: DataConfig = field(default_factory=DataConfig)
    freeze: list[str] = field(default_factory=lambda: ["vision_encoder"])
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    anyres: bool = False
    steps: int | None = None
    tokens: int | None = None  # alternative to steps: stop once this many tokens were trained
    checkpoint_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: no held-out eval
    eval_batches: int = 2
    benchmarks: BenchmarkConfig = field(default_factory=BenchmarkConfig)  # run at the end of the stage
    log_every: int = 1
    seed: int = 0  # the run's seed: data order (the loader's seed), noise, dropout
    source: str | None = None  # the file this came from (set by the loader)


@dataclass
class PipelineConfig:
    name: str
    stages: list[StageConfig]
    source: str | None = None


# -- generic dataclass-from-dict with field-named errors ------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, file: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, file)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"expected a mapping, got {type(value).__name__}", field=where, file=file)
        return _build(tp, value, where, file)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"expected a list, got {type(value).__name__}", field=where, file=file)
        return [_coerce(v, args[0], f"{where}[{i}]", file) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"expected a list of {len(args)} numbers", field=where, file=file)
        return tuple(_coerce(v, a, f"{where}[{i}]", file) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"expected a number, got {value!r}", field=where, file=file)
        if not math.isfinite(value):  # `.nan` / `.inf` would pass every range check below
            raise UserError(f"expected a finite number, got {value!r}", field=where, file=file)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"expected an integer, got {value!r}", field=where, file=file)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"expected true or false, got {value!r}", field=where, file=file)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"expected a string, got {value!r}", field=where, file=file)
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} at {where}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, raw: dict, prefix: str, file: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names or key == "source":
            known = ", ".join(sorted(n for n in names if n != "source"))
            raise UserError(f"unknown field (known: {known})", field=_join(prefix, key), file=file)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError("required field is missing", field=_join(prefix, f.name), file=file)
            continue
        where = _join(prefix, f.name)
        kwargs[f.name] = _coerce(raw[f.name], hints[f.name], where, file)
    return cls(**kwargs)


# -- semantic checks ------------------------------------------------------------------------------


def _check_stage(cfg: StageConfig, file: str) -> None:
    def bad(field_: str, msg: str) -> UserError:
        return UserError(msg, field=field_, file=file)

    if cfg.stage not in STAGE_KINDS:
        raise bad("stage", f"unknown stage kind {cfg.stage!r}; one of {', '.join(STAGE_KINDS)}")
    if (cfg.steps is None) == (cfg.tokens is None):
        raise bad("steps", "give exactly one of `steps` or `tokens`")
    for name in ("steps", "tokens"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise bad(name, "must be > 0")
    if (cfg.data.manifest is None) == (cfg.data.spec is None):
        raise bad("data", "give exactly one of `data.manifest` (built) or `data.spec` (built at start)")
    if cfg.data.generate not in (None, "tiny"):
        raise bad("data.generate", "only `tiny` is known")
    if cfg.init.path is None and cfg.model is None:
        raise bad("init.path", "give `init.path` (a saved model) or `model` (a preset built from scratch)")
    for i, g in enumerate(cfg.freeze):
        if g not in MODULE_GROUPS:
            raise bad(f"freeze[{i}]", f"unknown module group {g!r}; one of {', '.join(MODULE_GROUPS)}")
    if "vision_encoder" not in cfg.freeze:
        raise bad("freeze", "the vision encoder is frozen in every stage; keep `vision_encoder` listed")
    if cfg.lora.enabled and cfg.lora.rank <= 0:
        raise bad("lora.rank", "must be > 0")
    if cfg.stage in LORA_KINDS and not cfg.lora.enabled:
        raise bad("lora.enabled", f"the {cfg.stage} stage trains LoRA adapters; set `lora.enabled: true`")
    if cfg.stage == "dpo" and "vision_tokenizer" not in cfg.freeze:
        # the reference is the adapter-disabled model: a training resampler would move it too
        raise bad("freeze", "the dpo reference is the model without its adapters; keep `vision_tokenizer` "
                  "listed so the reference stays fixed")
    o, b = cfg.optim, cfg.batch
    if o.lr <= 0:
        raise bad("optim.lr", "must be > 0")
    if not 0 <= o.min_lr_ratio <= 1:
        raise bad("optim.min_lr_ratio", "must be in [0, 1]")
    if o.warmup_steps < 0:
        raise bad("optim.warmup_steps", "must be >= 0")
    if o.grad_clip < 0:
        raise bad("optim.grad_clip", "must be >= 0 (0 disables clipping)")
    for name in ("micro_batch_size", "grad_accum", "seq_len"):
        if getattr(b, name) <= 0:
            raise bad(f"batch.{name}", "must be > 0")
    if b.pack and cfg.stage not in ("pretrain",):
        raise bad("batch.pack", "packing is for pretrain (SFT/DPO samples keep their own rows)")
    if cfg.dpo.beta <= 0:
        raise bad("dpo.beta", "must be > 0")
    if cfg.runtime.precision not in ("auto", "bf16", "fp32"):
        raise bad("runtime.precision", "one of auto, bf16, fp32")
    if cfg.data.num_workers < 0:
        raise bad("data.num_workers", "must be >= 0 (0 reads on the training thread)")
    if cfg.data.shuffle_buffer < 1:
        raise bad("data.shuffle_buffer", "must be >= 1")
    if cfg.runtime.reduce_dtype not in ("fp32", "bf16"):
        raise bad("runtime.reduce_dtype", "one of fp32, bf16")
    if cfg.runtime.loss not in ("chunked", "dense"):
        raise bad("runtime.loss", "one of chunked, dense")
    from blip3.model.attention import ATTENTION

    if cfg.runtime.attention not in ATTENTION:
        raise bad("runtime.attention", f"one of {', '.join(ATTENTION)}")
    if cfg.runtime.cpu_threads < 0:
        raise bad("runtime.cpu_threads", "must be >= 0 (0 = torch's default)")
    for name in ("checkpoint_every", "eval_every", "log_every"):
        if getattr(cfg, name) < 0:
            raise bad(name, "must be >= 0")
    if cfg.eval_every and cfg.eval_batches < 1:  # else every evaluation would log a loss of 0.0
        raise bad("eval_batches", "must be >= 1 when eval_every is set")
    _check_benchmarks(cfg.benchmarks, bad)


def _check_benchmarks(bm: BenchmarkConfig, bad) -> None:
    """Fail at load time, not after hours of training, on a task name or setting eval would refuse."""
    from blip3.eval.tasks import TASKS

    for i, name in enumerate(bm.tasks):
        if name not in TASKS:
            raise bad(f"benchmarks.tasks[{i}]", f"unknown eval task {name!r}; one of {', '.join(TASKS)}")
        if bm.shots and TASKS[name].zero_shot_only:
            raise bad(f"benchmarks.tasks[{i}]", f"{name} is a zero-shot instruct benchmark; use `shots: 0`")
    if bm.shots < 0:
        raise bad("benchmarks.shots", "must be >= 0")
    if bm.limit is not None and bm.limit <= 0:
        raise bad("benchmarks.limit", "must be > 0")
    if bm.batch_size <= 0:
        raise bad("benchmarks.batch_size", "must be > 0")


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None:
        return None
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q))


def _read_yaml(path: Path) -> dict:
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError("expected a mapping at the top level", file=path)
    return raw


def stage_from_dict(raw: dict, file: str | Path) -> StageConfig:
    """Build and validate a stage from a parsed mapping (see the module doc for paths)."""
    file = str(file)
    cfg = _build(StageConfig, raw, "", file)
    _check_stage(cfg, file)
    base = Path(file).parent
    cfg.data.manifest = _resolve(base, cfg.data.manifest)
    cfg.data.spec = _resolve(base, cfg.data.spec)
    cfg.benchmarks.data = _resolve(base, cfg.benchmarks.data)
    cfg.source = file
    return cfg


def load_stage(path: str | Path) -> StageConfig:
    """Read one stage YAML; raises `UserError` naming the field and the file."""
    path = Path(path)
    return stage_from_dict(_read_yaml(path), path)


def is_pipeline(raw: dict) -> bool:
    return "stages" in raw and "stage" not in raw


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read a pipeline YAML (`name`, `stages: [stage files]`); every stage validated up front."""
    path = Path(path)
    raw = _read_yaml(path)
    unknown = set(raw) - {"name", "stages"}
    if unknown:
        raise UserError(f"unknown field (known: name, stages)", field=sorted(unknown)[0], file=path)
    if not isinstance(raw.get("name"), str):
        raise UserError("required string", field="name", file=path)
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError("a non-empty list of stage files", field="stages", file=path)
    out = []
    for i, entry in enumerate(stages):
        if not isinstance(entry, str):
            raise UserError("expected a stage file path", field=f"stages[{i}]", file=path)
        out.append(load_stage(_resolve(path.parent, entry)))
    return PipelineConfig(name=raw["name"], stages=out, source=str(path))


def load_any(path: str | Path) -> PipelineConfig:
    """A stage file is a one-stage pipeline, so `blip3 train` treats both the same way."""
    path = Path(path)
    raw = _read_yaml(path)
    if is_pipeline(raw):
        return load_pipeline(path)
    stage = stage_from_dict(raw, path)
    return PipelineConfig(name=stage.name, stages=[stage], source=str(path))
