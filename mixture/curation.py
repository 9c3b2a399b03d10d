"""Which samples a mixture leaves out: the `curation` field of a mixture spec.

    curation: {exclude: [near_dup, clip_below_0.28], keep_all: false}

- Decontamination (`decontam`: the sample's image is a `blip3 eval` benchmark image) is excluded
  by default; `keep_all: true` drops that default, so only the rules listed apply.
- `exclude` names rules of `sample_decisions` (`blip3 curate`: `exact_dup`, `near_dup`,
  `sem_dup`, `min_side`, `clip`, `language`, ...: the samples a rule did not keep are left out)
  or score thresholds evaluated here on `sample_scores`, `<score>_below_<x>` / `<score>_above_<x>`
  (`clip_below_0.3`), so another threshold needs no new curation run.
- A rule named in `exclude` applies to the catalogued sources it was decided for; one decided for
  none of them is an error (a typo or a missing `blip3 curate` run must not silently remove
  nothing), one missing for some sources is a warning naming them. The default `decontam`
  applies where it was recorded.

The left-out samples are listed per shard in the manifest (`exclude: [keys]`), and the shard's
`samples` is what remains, so the loader's arithmetic (and its exact resume) runs over the kept
samples only. Nothing is removed from any shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blip3.core.curation import excluded_samples
from blip3.core.errors import UserError
from blip3.datagen.curate_rules import CROSS_SAMPLE_RULES, LANGUAGE_RULE, THRESHOLD_RULES, score_rule

DEFAULT_EXCLUDE = ("decontam",)
KNOWN_RULES = (*CROSS_SAMPLE_RULES, *THRESHOLD_RULES, LANGUAGE_RULE, "decodes")


def validate_curation(data: Any, file: str | None = None) -> dict[str, Any]:
    """The spec's `curation` mapping with defaults filled in: `{exclude: [...], keep_all: bool}`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("must be a mapping {exclude: [rules], keep_all: false}", field="curation", file=file)
    unknown = set(data) - {"exclude", "keep_all"}
    if unknown:
        raise UserError(f"unknown field(s) {', '.join(sorted(unknown))}", field=f"curation.{sorted(unknown)[0]}",
                        file=file)
    keep_all = data.get("keep_all", False)
    if not isinstance(keep_all, bool):
        raise UserError(f"must be true or false, got {keep_all!r}", field="curation.keep_all", file=file)
    exclude = data.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(r, str) for r in exclude):
        raise UserError("must be a list of rule names", field="curation.exclude", file=file)
    for i, rule in enumerate(exclude):
        if rule not in KNOWN_RULES and score_rule(rule) is None:
            raise UserError(f"unknown rule {rule!r}: one of {', '.join(KNOWN_RULES)}, or <score>_below_<x> / "
                            "<score>_above_<x> (e.g. clip_below_0.28)", field=f"curation.exclude[{i}]", file=file)
    listed = list(dict.fromkeys(exclude))
    rules = listed if keep_all else list(dict.fromkeys([*DEFAULT_EXCLUDE, *listed]))
    return {"exclude": listed, "keep_all": keep_all, "rules": rules}


@dataclass
class Exclusions:
    """What the curation rules leave out of one source."""

    keys: dict[str, set[str]] = field(default_factory=dict)  # shard path -> keys left out
    removed: dict[str, int] = field(default_factory=dict)  # rule applied -> samples it left out (a sample
    # left out by two rules counts for both)


def source_exclusions(con, source: str, rules: list[str]) -> Exclusions:
    """The samples of `source` that `rules` leave out, from the catalog connection `con` (a rule
    not decided for the source leaves nothing out of it and is not in `removed`)."""
    # a rule not decided for this source is not applied to it: `check_rules_applied` says so
    applied, rows = excluded_samples(con, source, [(rule, score_rule(rule)) for rule in rules])
    out = Exclusions()
    if not applied:
        return out
    out.removed = {rule: 0 for rule in applied}
    for shard, key, rule in rows:
        out.keys.setdefault(shard, set()).add(key)
        out.removed[rule] += 1
    return out


def check_rules_applied(curation: dict[str, Any], removed: dict[str, dict[str, int] | None],
                        file: str | None) -> list[str]:
    """A rule listed in `exclude` must have been decided for at least one catalogued source of the
    mixture (else a typo or a missing `blip3 curate` run would silently remove nothing): a
    UserError. Returns one warning per (listed rule, catalogued source) it was not decided for."""
    warnings = []
    for i, rule in enumerate(curation["exclude"]):
        missing = [name for name, got in removed.items() if rule not in (got or {})]
        if removed and len(missing) == len(removed):
            what = "scores" if score_rule(rule) else "decisions"
            raise UserError(f"no source of the mixture has {what} of rule {rule!r}; run `blip3 curate` "
                            "(see docs/curation.md)", field=f"curation.exclude[{i}]", file=file)
        warnings += [f"curation rule {rule!r} was not decided for source {name!r}: nothing of it left out"
                     for name in missing]
    return warnings
