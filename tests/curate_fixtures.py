"""Caption sources with planted copies, for the curation tests: smooth random pictures (a resized
copy keeps their low frequencies, as with photos), a lossless re-encode, a resized copy and a
benchmark image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from blip3.core.shards import SampleRow, ShardWriter


def picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A smooth random picture: 6x5 random colours upsampled (bicubic), plus mild noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    img = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-6, 7, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


CAPTIONS = ["a small boat on a quiet lake at dawn", "two dogs playing with a ball in the park",
            "a red bicycle leaning against a brick wall", "a plate of pasta with tomato sauce",
            "children walking to school in the rain", "a mountain road covered in fresh snow"]


def write_source(out: Path, samples: list[tuple[str, bytes, str]], *, shard_size: int = 4) -> Path:
    """Write (key, image bytes, caption) samples as shards of `shard_size`."""
    for start in range(0, len(samples), shard_size):
        with ShardWriter(out, start // shard_size, generator={"name": "test"}) as w:
            for key, data, caption in samples[start:start + shard_size]:
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
                ext = "png" if data[:4] == b"\x89PNG" else "jpg"
                w.add(key, {ext: data, "txt": caption, "json": {"uid": key}},
                      SampleRow(key, uid=key, width=width, height=height, image_bytes=len(data),
                                caption_length=len(caption), n_captions=1))
    return out


def planted_sources(root: Path, benchmark_image: bytes) -> dict:
    """Two sources: `web` (10 distinct pictures) and `more` (4 distinct ones plus the plants):
    `more/copy` is web/w0003 decoded and re-encoded as PNG (same pixels, other bytes), `more/small` is
    web/w0005 resized to 3/4 and re-compressed, `more/bench` is a benchmark image's bytes. `more` has 3 samples a shard: (m0000-m0002), (m0003, copy,
    small), (bench)."""
    web = [(f"w{i:04d}", encode(picture(i)), CAPTIONS[i % len(CAPTIONS)]) for i in range(10)]
    more = [(f"m{i:04d}", encode(picture(100 + i)), CAPTIONS[(i + 2) % len(CAPTIONS)]) for i in range(4)]
    more += [("copy", encode(Image.open(io.BytesIO(web[3][1])), "PNG"), "the same picture stored again"),
             ("small", encode(picture(5).resize((72, 54), Image.Resampling.LANCZOS)), "a smaller copy of it"),
             ("bench", benchmark_image, "a picture also in the benchmark")]
    return {"web": write_source(root / "web", web), "more": write_source(root / "more", more, shard_size=3)}
