"""From mixture samples to training batches, resumable to the sample.

`BatchStream` pulls sample dicts from a `mixture.loader.MixtureLoader`, encodes them with the
model's processor (caption, interleaved document, chat, preference pair) and assembles one
micro-batch at a time:

- pretrain: packed rows (`segment_ids`), `micro_batch_size` rows of `seq_len` tokens;
- sft / interleave / safety: one chat per row, padded; labels only on assistant tokens;
- dpo: rows `[chosen_1..P, rejected_1..P]` of chats sharing the prompt; with
  `noised_image_chosen_as_rejected`, P more pairs whose rejected side is the chosen answer given a
  Gaussian-noised image (an image-conditioned preference: the answer must come from the image).

State for exact resume = the loader's position before the first sample read but not yet used
(the one that overflowed the last packed row): a resume reads and encodes it again (encoding is
deterministic), so the state is a few integers, JSON in the checkpoint, never encoded tensors.
Noise uses the global torch RNG, which checkpoints hold.

A sample that cannot be encoded (an undecodable image, more `<image>` markers than images:
`model.processor.UnencodableSample`) is skipped: logged with its key and shard, and counted in the
batch's `skipped` (the metrics' `skipped` column), never the end of the stage. Only a long run of
them (`MAX_SKIPS_IN_A_ROW`: the data, not a sample, is wrong) stops the stage, in one line.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
from PIL import Image

from blip3.core.errors import UserError
from blip3.core.logs import get_logger
from blip3.core.records import Caption, Chat, Content, Document, Preference, RecordError, record_kind
from blip3.model.processor import RowPacker, UnencodableSample

log = get_logger("train")
#: Consecutive samples that could not be encoded after which the stage stops (one line).
MAX_SKIPS_IN_A_ROW = 1000

#: Which source kinds each stage reads.
STAGE_SOURCE_KINDS = {
    "pretrain": ("caption", "interleaved"),
    "sft": ("sft",),
    "interleave": ("sft", "interleaved"),
    "dpo": ("dpo",),
    "safety": ("sft",),
}


def check_kinds(stage: str, manifest, file: str | None) -> None:
    allowed = STAGE_SOURCE_KINDS[stage]
    for i, src in enumerate(manifest.sources):
        if src.kind not in allowed:
            raise UserError(
                f"source {src.name!r} is {src.kind!r}; a {stage} stage reads {', '.join(allowed)}",
                field=f"data (sources[{i}].kind)", file=file,
            )


def _image(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise UnencodableSample(f"image cannot be decoded ({type(e).__name__}: {' '.join(str(e).split())[:120]})") \
            from None


def _content(sample: dict[str, Any]) -> Content:
    """The sample's content as its kind's record type reads it (core/records.py); a record that does
    not fit its kind is one UserError naming the sample."""
    try:
        return record_kind(sample["kind"]).read(sample["json"], sample.get("txt"), sample["images"])
    except RecordError as e:
        raise UserError(f"{sample['kind']} sample {sample['key']}: {e}", file=sample.get("shard")) from None


def _images(sample: dict[str, Any], names: list[str | None]) -> list[Image.Image | None]:
    return [None if n is None else _image(sample["images"][n]) for n in names]


def _encode_caption(processor, sample, c: Caption):
    return processor.encode_caption(c.text, _image(sample["images"][c.image]))


def _encode_document(processor, sample, d: Document):
    return processor.encode_interleaved(d.texts, _images(sample, d.images))


def _encode_chat(processor, sample, c: Chat):
    return processor.encode_chat(c.turns, _images(sample, c.images))


#: How the trainer encodes each content type of core/records.py (a preference pair: encode_pair).
_ENCODERS: dict[type, Callable[..., Any]] = {Caption: _encode_caption, Document: _encode_document, Chat: _encode_chat}


def encode_sample(processor, sample: dict[str, Any]):
    """One non-preference sample -> `model.processor.Encoded`."""
    content = _content(sample)
    encoder = _ENCODERS.get(type(content))
    if encoder is None:
        raise ValueError(f"encode_sample does not take kind {sample['kind']!r}")
    return encoder(processor, sample, content)


def encode_pair(processor, sample: dict[str, Any]):
    """A preference pair -> (chosen, rejected) chats sharing the prompt and images."""
    p = _content(sample)
    if not isinstance(p, Preference):
        raise ValueError(f"encode_pair does not take kind {sample['kind']!r}")
    images = _images(sample, p.images)
    user = {"role": "user", "content": p.prompt}
    chosen = processor.encode_chat([user, {"role": "assistant", "content": p.chosen}], images)
    rejected = processor.encode_chat([user, {"role": "assistant", "content": p.rejected}], images)
    return chosen, rejected


def noised(enc, std: float):
    """The same encoded chat with Gaussian noise added to its (normalised) pixels."""
    return replace(enc, images=[c + std * torch.randn_like(c) for c in enc.images])


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # model kwargs (input_ids, labels, attention_mask | segment_ids, images)
    n_pairs: int = 0  # dpo: rows are [chosen x n_pairs, rejected x n_pairs]
    skipped: int = 0  # samples dropped: longer than a packed row, or not encodable


@dataclass
class Skipped:
    """A sample that could not be encoded (what a worker hands back instead of it)."""

    key: str
    shard: str | None
    reason: str


class _Encode:
    """The per-sample work a DataLoader worker does off the training thread: decode and encode
    (a preference pair for dpo). Picklable, so it travels to the workers."""

    def __init__(self, processor, stage: str):
        self.processor = processor
        self.stage = stage

    def one(self, sample: dict[str, Any]):
        try:
            return encode_pair(self.processor, sample) if self.stage == "dpo" else encode_sample(self.processor, sample)
        except UnencodableSample as e:
            return Skipped(str(sample.get("key")), sample.get("shard"), str(e))

    def __call__(self, samples: list[dict[str, Any]]):  # DataLoader collate of batch_size=1
        return self.one(samples[0])


class BatchStream:
    """Micro-batches for one stage, from one rank's slice of the mixture.

    num_workers > 0: samples are read, decoded and encoded in that many DataLoader worker
    processes (`MixtureLoader.dataloader`, whose state covers what the trainer consumed, so resume
    stays exact); packing, collation and the RNG-drawing noised pairs stay here, in order.
    pin_memory: batches are put in page-locked memory, so the copy to the GPU can overlap.
    """

    def __init__(self, loader, processor, *, stage: str, micro_batch_size: int, seq_len: int, pack: bool,
                 noised_image_chosen_as_rejected: bool = False, noise_std: float = 1.0, num_workers: int = 0,
                 pin_memory: bool = False):
        self.loader = loader
        self.processor = processor
        self.stage = stage
        self.rows = micro_batch_size
        self.seq_len = seq_len
        self.pack = pack
        self.noised_image_chosen_as_rejected = noised_image_chosen_as_rejected
        self.noise_std = noise_std
        # samples read but not used yet, each with the loader state from before it was read
        self._pending: list[tuple[Any, dict]] = []
        self._it = None
        self._encode = _Encode(processor, stage)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._unencodable = 0  # samples skipped as not encodable since the last batch

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"loader": self._pending[0][1] if self._pending else self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, mine = state["loader"].get("num_workers", 1), max(1, self.num_workers)
        if state["loader"].get("counts") and saved != mine:  # each worker owns a slice of the data
            raise UserError(f"the data position was saved with {saved} loader worker(s), this run has {mine}; "
                            "resume with the same data.num_workers", field="data.num_workers")
        self.loader.load_state_dict(state["loader"])
        self._pending = []
        self._it = None

    # -- reading -------------------------------------------------------------------------------
    def _next_encoded(self):
        if self._it is None:
            if self.num_workers:
                self._it = iter(self.loader.dataloader(1, num_workers=self.num_workers, collate_fn=self._encode))
            else:
                self._it = map(self._encode.one, self.loader)
        return next(self._it)

    def _encoded(self):
        """(the next encoded sample, the loader state from before it was read); samples that
        cannot be encoded are logged, counted and passed over."""
        if self._pending:
            return self._pending.pop(0)
        for _ in range(MAX_SKIPS_IN_A_ROW):
            before = self.loader.state_dict()
            enc = self._next_encoded()
            if not isinstance(enc, Skipped):
                return enc, before
            self._unencodable += 1
            log.warning(f"skipped sample {enc.key} of {enc.shard}: {enc.reason}")
        raise UserError(f"{MAX_SKIPS_IN_A_ROW} samples in a row could not be encoded; the last, {enc.key} of "
                        f"{enc.shard}: {enc.reason}", field="data")

    def next(self) -> Batch:
        if self.stage == "dpo":
            batch = self._dpo()
        elif self.pack:
            batch = self._packed()
        else:
            batch = Batch(self.processor.collate([self._encoded()[0] for _ in range(self.rows)]))
        batch.skipped += self._unencodable
        self._unencodable = 0
        if self.pin_memory:
            batch.inputs = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
        return batch

    def _packed(self) -> Batch:
        """Fill `rows` rows by the processor's packing rule; the sample that would open one more
        row waits in `_pending` for the next batch."""
        packer, skipped = RowPacker(self.seq_len, max_rows=self.rows), 0
        while True:
            enc, before = self._encoded()
            if len(enc) > self.seq_len:
                skipped += 1
                continue
            if not packer.add(enc):
                self._pending.insert(0, (enc, before))
                break
        chosen = [s for row in packer.rows for s in row]
        return Batch(self.processor.pack(chosen, self.seq_len), skipped=skipped)

    def _dpo(self) -> Batch:
        pairs = [self._encoded()[0] for _ in range(self.rows)]
        if self.noised_image_chosen_as_rejected:
            pairs += [(c, noised(c, self.noise_std)) for c, _ in pairs if c.images]
        chosen, rejected = zip(*pairs)
        return Batch(self.processor.collate([*chosen, *rejected]), n_pairs=len(pairs))


class DataRanks:
    """This process's micro-batches: those of the data ranks it plays, in turn.

    Which samples a rank reads depends on the number of ranks (each its own slots of the mixture,
    `mixture.loader`), so a run keeps the split it started with, its *data world size* D, in its
    checkpoints. Resumed on W processes (W dividing D), process p plays data ranks p, p + W, ...
    and takes one micro-batch from each in turn. With `grad_accum` scaled by D / W, a step then
    holds the very micro-batches the interrupted run would have used, and the step's objective
    (one mean over all its labelled tokens) does not depend on which process computed which: the
    loss curve carries on as if the world size had never changed.

    `make(rank, world_size)` builds the `BatchStream` of one data rank; `grad_accum`: the
    micro-batches of a step, a multiple of the data ranks played (each gives one per turn).
    """

    def __init__(self, make: Callable[[int, int], BatchStream], rank: int, world_size: int, *, grad_accum: int = 1):
        self._make = make
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.data_world_size = world_size
        self.streams = [make(rank, world_size)]
        self._turn = 0

    @property
    def data_ranks(self) -> list[int]:
        return list(range(self.rank, self.data_world_size, self.world_size))

    def next(self) -> Batch:
        batch = self.streams[self._turn].next()
        self._turn = (self._turn + 1) % len(self.streams)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"data_world_size": self.data_world_size, "turn": self._turn,
                "ranks": {str(r): s.state_dict() for r, s in zip(self.data_ranks, self.streams)}}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from `states`: the data state each process of the saving run wrote, in rank order."""
        with _data_position_errors():
            states = [st if "ranks" in st else {"data_world_size": len(states), "turn": 0, "ranks": {str(i): st}}
                      for i, st in enumerate(states)]  # a checkpoint of one stream per process
            data_world = int(states[0]["data_world_size"])
            saved = {int(r): st for state in states for r, st in state["ranks"].items()}
            turns = [int(state["turn"]) for state in states]
        if data_world < 1:
            raise UserError(f"the checkpoint's data position is of {data_world} data ranks", field="data")
        if data_world % self.world_size:
            raise UserError(f"the data position was saved as {data_world} data rank(s); resume on a number of "
                            f"processes that divides {data_world}, not {self.world_size}", field="world size")
        per_process = data_world // self.world_size
        if self.grad_accum % per_process:
            raise UserError(f"the run continues {data_world} data ranks on {self.world_size} process(es), "
                            f"{per_process} each: grad_accum must be a multiple of {per_process} "
                            f"(x{per_process} keeps the step of the saved run)", field="batch.grad_accum")
        if sorted(saved) != list(range(data_world)):
            raise UserError(f"the checkpoint holds the data position of ranks {sorted(saved)} of {data_world}",
                            field="data")
        saved_per_process = max(1, data_world // len(states))  # the streams each saving process took turns over
        if any(not 0 <= t < saved_per_process for t in turns):
            raise UserError(f"the checkpoint's data position is at turn {max(turns)} of {saved_per_process}",
                            field="data")
        if len(states) == self.world_size:
            turn = turns[self.rank]
        elif any(turns):  # between two micro-batches of a step
            raise UserError("the data position was saved in the middle of a step; resume on the same number "
                            "of processes", field="world size")
        else:
            turn = 0
        if data_world != self.data_world_size:
            self.data_world_size = data_world
            self.streams = [self._make(r, data_world) for r in self.data_ranks]
        with _data_position_errors():
            for r, stream in zip(self.data_ranks, self.streams):
                stream.load_state_dict(saved[r])
        self._turn = turn


@contextlib.contextmanager
def _data_position_errors() -> Iterator[None]:
    """A data position that is not what `state_dict` writes (it is read from a checkpoint on disk)
    as one UserError."""
    try:
        yield
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"the checkpoint's data position cannot be read ({type(e).__name__}: {detail})",
                        field="data") from None


def count_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) positions of a batch: what tokens/s and MFU count."""
    if inputs.get("segment_ids") is not None:
        return int((inputs["segment_ids"] > 0).sum())
    if inputs.get("attention_mask") is not None:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())


def count_crops(inputs: dict[str, torch.Tensor], config) -> int:
    """Crops of a batch (what the ViT and the resampler process): each fills num_latents placeholders."""
    slots = int((inputs["input_ids"] == config.image_placeholder_id).sum())
    return slots // config.num_latents
