"""The trainer reads samples through their kind's record type (core/records.py), never record
fields of its own: a new source kind is a record class plus, at most, an encoder for its content."""

from __future__ import annotations

import io

import pytest

from blip3.core import records
from blip3.core.errors import UserError
from blip3.core.records import Chat, RecordError, RecordKind
from blip3.train.data import encode_pair, encode_sample
from tests.model_fixtures import noise_image, tiny_config, tiny_processor  # noqa: F401


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    noise_image(40, 30, seed).save(buf, format="PNG")
    return buf.getvalue()


def _sample(kind: str, rec: dict, images: dict, txt: str | None = None) -> dict:
    return {"source": "s", "kind": kind, "key": "k1", "json": rec, "txt": txt, "images": images, "shard": "s/00000.tar"}


class VqaRecord(RecordKind):
    """A kind the trainer has never heard of: one question and its answer about one image."""

    name = "vqa"

    def _check_fields(self, rec, members) -> None:
        if not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
            raise RecordError("json needs string 'question' and 'answer'")

    def texts(self, rec, txt) -> list[str]:
        return [rec["question"], rec["answer"]]

    def content(self, rec, txt, members) -> Chat:
        return Chat([{"role": "user", "content": "<image>\n" + rec["question"]},
                     {"role": "assistant", "content": rec["answer"]}], self.image_names(rec, members))


def test_a_new_kind_trains_through_its_record_type_alone(monkeypatch, tiny_processor):  # noqa: F811
    monkeypatch.setitem(records.RECORD_KINDS, "vqa", VqaRecord())
    image = _png()
    vqa = encode_sample(tiny_processor, _sample("vqa", {"question": "What?", "answer": "Noise.", "images": ["0.png"]},
                                                {"0.png": image}))
    sft = encode_sample(tiny_processor, _sample("sft", {
        "conversations": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Noise."}],
        "images": ["0.png"]}, {"0.png": image}))
    assert vqa.input_ids == sft.input_ids and vqa.labels == sft.labels and len(vqa.images) == 1
    with pytest.raises(UserError, match="vqa sample k1: json needs string 'question' and 'answer'"):
        encode_sample(tiny_processor, _sample("vqa", {"question": "What?"}, {"0.png": image}))


def test_each_kind_encodes_what_its_record_type_reads(tiny_processor):  # noqa: F811
    from PIL import Image

    a, b = _png(1), _png(2)
    pil = {n: Image.open(io.BytesIO(d)).convert("RGB") for n, d in (("a", a), ("b", b))}
    p = tiny_processor
    caption = encode_sample(p, _sample("caption", {"caption": "from json"}, {"jpg": a}, txt="from txt"))
    assert caption.input_ids == p.encode_caption("from txt", pil["a"]).input_ids
    doc = encode_sample(p, _sample("interleaved", {"texts": ["intro", None, "outro"], "images": [None, "img0.png", None]},
                                   {"img0.png": b}))
    assert doc.input_ids == p.encode_interleaved(["intro", None, "outro"], [None, pil["b"], None]).input_ids
    chosen, rejected = encode_pair(p, _sample("dpo", {"prompt": "<image>\nWhich?", "chosen": "A.", "rejected": "B.",
                                                      "images": ["0.png"]}, {"0.png": a}))
    user = {"role": "user", "content": "<image>\nWhich?"}
    assert chosen.input_ids == p.encode_chat([user, {"role": "assistant", "content": "A."}], [pil["a"]]).input_ids
    assert rejected.input_ids == p.encode_chat([user, {"role": "assistant", "content": "B."}], [pil["a"]]).input_ids


@pytest.mark.parametrize("kind,rec,images,message", [
    ("sft", {"conversations": [{"role": "user", "content": "<image>\nWhat?"}], "images": ["1.png"]}, {"0.png": b""},
     "sft sample k1: image member(s) 1.png listed in json but absent from the tar"),
    ("interleaved", {"texts": ["a"], "images": [None, "0.png"]}, {}, "interleaved sample k1: json needs 'texts' and "
     "'images' lists of equal length"),
    ("dpo", {"prompt": "p", "chosen": "c", "rejected": "r", "images": "0.png"}, {"0.png": b""},
     "dpo sample k1: json 'images' must be a list of image member names"),
    ("caption", {"caption": "x"}, {}, "caption sample k1: a caption sample needs an image member"),
])
def test_a_record_that_does_not_fit_its_kind_is_one_user_error(tiny_processor, kind, rec, images, message):  # noqa: F811
    encode = encode_pair if kind == "dpo" else encode_sample
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        encode(tiny_processor, _sample(kind, rec, images))
    assert e.value.file is not None
