"""`blip3 mix plot`: a mixture's composition (target weight vs realised share of samples and of
tokens, per source) and its token budget (planned vs available tokens, with epochs), from the
catalog views, as one PNG drawn with matplotlib (Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from blip3.core.errors import UserError  # noqa: E402
from blip3.core.sql import run_query  # noqa: E402
from blip3.mixture.stats import _quote  # noqa: E402


def plot_mixture(name: str, out: str | Path, *, db: str | Path | None = None) -> Path:
    """Write the composition and token-budget figure of mixture `name` to `out`."""
    rows = run_query(f"SELECT * FROM v_mixture_sources WHERE mixture = {_quote(name)}", db).to_pylist()
    if not rows:
        raise UserError(f"no mixture {name!r} in the catalog; build it with `blip3 mix build`", field="NAME")
    names = [r["source"] for r in rows]
    y = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.45 * len(rows)), constrained_layout=True)
    h = 0.27
    ax1.barh([i - h for i in y], [r["target_weight"] for r in rows], h, label="target weight", color="#999")
    ax1.barh(list(y), [r["sample_share"] for r in rows], h, label="share of samples", color="#1f77b4")
    ax1.barh([i + h for i in y], [r["token_share"] for r in rows], h, label="share of tokens", color="#ff7f0e")
    ax1.set_yticks(list(y), names)
    ax1.invert_yaxis()
    ax1.set_xlabel("share of the mixture")
    ax1.set_title(f"{name}: composition")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.barh([i - h / 2 for i in y], [r["available_tokens"] for r in rows], h, label="available tokens", color="#bbb")
    ax2.barh([i + h / 2 for i in y], [r["planned_tokens"] for r in rows], h, label="planned tokens", color="#2ca02c")
    for i, r in enumerate(rows):
        ax2.annotate(f"{r['epochs']:.2f} ep", (max(r["available_tokens"], r["planned_tokens"]), i),
                     xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax2.set_yticks(list(y), names)
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.set_xlabel(f"tokens ({rows[0]['tokenizer']})")
    ax2.set_title("token budget per source (epochs = planned / available)")
    ax2.legend(loc="best", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
