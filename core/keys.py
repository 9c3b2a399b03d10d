"""Sample keys that are safe as tar member names and file names.

WebDataset splits a member name at the first dot after the last slash (`key.ext`), so a key may
hold neither `.` nor `/`. Keys from the wild (`../x`, `a/b.jpg`, unicode) are rewritten
deterministically: the safe characters are kept and, when anything had to change, a short hash of
the original is appended so two different raw keys never collide. The rewrite stays readable:
`/` and other separators become `_` (`cats/tabby/01` -> `cats_tabby_01_<hash>`), accents are
dropped (`été` -> `ete`), and a key too long keeps its END (the file name tells samples apart;
a shared folder prefix does not).
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
    norm = "".join(c for c in unicodedata.normalize("NFKD", raw) if not unicodedata.combining(c))
    safe = _SAFE.sub("_", norm).strip("_-")
    if safe == raw and 0 < len(safe) <= MAX_KEY_LEN:
        return safe
    digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    stem = safe[-(MAX_KEY_LEN - 11):].strip("_-") or "k"
    return f"{stem}_{digest}"


def is_safe_key(key: str) -> bool:
    return bool(key) and len(key) <= MAX_KEY_LEN and _SAFE.search(key) is None and key[0] not in "-_"
