"""Sample keys that are safe as tar member names and file names.

WebDataset splits a member name at the first dot after the last slash (`key.ext`), so a key may
hold neither `.` nor `/`. Keys from the wild (`../x`, `a/b.jpg`, unicode) are rewritten
deterministically: the safe characters are kept and, when anything had to change, a short hash of
the original is appended so two different raw keys never collide.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY_LEN = 96


def sanitize_key(raw: str) -> str:
    """Return a key matching `[A-Za-z0-9_-]{1,96}`; stable for the same input."""
    if not isinstance(raw, str):
        raw = str(raw)
    norm = unicodedata.normalize("NFKC", raw)
    safe = _SAFE.sub("_", norm).strip("_-")
    if safe == raw and 0 < len(safe) <= MAX_KEY_LEN:
        return safe
    digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    stem = safe[: MAX_KEY_LEN - 11] or "k"
    return f"{stem}_{digest}"


def is_safe_key(key: str) -> bool:
    return bool(key) and len(key) <= MAX_KEY_LEN and _SAFE.search(key) is None and key[0] not in "-_"
