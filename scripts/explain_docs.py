"""Write docs/explanations.md's result tables from the files the scripts wrote.

Reads the packaged SAEs' ``metrics.json`` (written by ``scripts/train_saes.py``),
``results/bench_explain.json`` (``melbo-lens bench --explain --threads 2 --out results
--overwrite``),
``results/cards_backdoored.json`` (``scripts/cards_backdoored.py``) and the built corpus
(``melbo-lens corpus build``), and replaces the block between the ``<!-- results -->``
markers of ``docs/explanations.md``. No number in that block is typed by hand.

    python scripts/explain_docs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melbo_lens.analysis.corpus import load_corpus  # noqa: E402
from melbo_lens.analysis.sae import PACKAGED_SAES, packaged_sae_dir  # noqa: E402

DOC = ROOT / "docs" / "explanations.md"
START, END = "<!-- results -->", "<!-- /results -->"


def corpus_table() -> list[str]:
    c = load_corpus("melbo-chat-prose")
    m = c.provenance
    s = m.get("settings", {})
    return [
        "**Corpus** (`melbo-lens corpus build`, manifest in the melbo_lens cache):",
        "",
        "| name | documents | chat | prose | train | held-out | tokens (SmolLM2) | sha256 |",
        "|---|---|---|---|---|---|---|---|",
        f"| {c.name} | {len(c)} | {m.get('chat', 0)} | {m.get('prose', 0)} | "
        f"{m.get('train', 0)} | {m.get('heldout', 0)} | {m.get('n_tokens', 0):,} | "
        f"`{str(m.get('sha256'))[:12]}…` |",
        "",
        f"Recipe version {m.get('recipe_version')}: {len(m.get('packages', {}))} sources, "
        f"chat fraction {s.get('chat_fraction')}, {s.get('arithmetic')} clean arithmetic chats, "
        f"one document in {s.get('heldout_every')} held out (by content hash).",
        "",
    ]


def sae_table() -> list[str]:
    rows = [
        "**Packaged SAEs** (`python scripts/train_saes.py`; each folder's `metrics.json`):",
        "",
        "Dead = never active on the ~16k held-out tokens of that row: an upper bound, since "
        "8,192 latents with k = 32 fire ~64 times each on average over 16k tokens; the "
        "dashboards passes below count latents never active over ~1M corpus tokens.",
        "",
        "| SAE | latents | k | train samples (unique tokens) | kind | ctx | FVE | dead | L0 "
        "| CE clean | CE with SAE | CE recovered (vs zero / mean ablation) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(k for k in PACKAGED_SAES if "/" not in k):
        m = json.loads((packaged_sae_dir(name) / "metrics.json").read_text())
        t = m["train"]
        for key in sorted(k for k in m if k.startswith("recon_")):
            kind_ctx = key[len("recon_") :]
            r, ce = m[key], m.get("ce_" + kind_ctx, {})
            rows.append(
                f"| {name} | {m['d_sae']} | {m['k']} | {t['train_samples']:,} "
                f"({t['unique_train_tokens']:,}) | {kind_ctx.split('_ctx')[0]} | "
                f"{kind_ctx.split('_ctx')[-1]} | {r['fve']:.3f} | {r['dead_frac']:.3f} | "
                f"{r['l0']:.0f} | {ce.get('ce_clean', float('nan')):.3f} | "
                f"{ce.get('ce_sae', float('nan')):.3f} | "
                f"{ce.get('ce_recovered_zero', float('nan')):.3f} / "
                f"{ce.get('ce_recovered_mean', float('nan')):.3f} |"
            )
    return [*rows, ""]


BENCH = "melbo-lens bench --explain --threads 2 --out results --overwrite"


def bench_table() -> list[str]:
    path = ROOT / "results" / "bench_explain.json"
    if not path.is_file():
        return [f"*(no `results/bench_explain.json` yet: run `{BENCH}`)*", ""]
    b = json.loads(path.read_text())
    d, c = b["dashboards"], b["cards"]
    return [
        f"**Speed and memory** (`{BENCH}`, {b['threads']} CPU threads; "
        "`results/bench_explain.json`):",
        "",
        "| what | size | seconds | target | reference in the same run | peak memory |",
        "|---|---|---|---|---|---|",
        f"| dashboards, all latents of {b['sae']} | {d['latents']} latents x {d['tokens']:,} "
        f"tokens | {d['seconds']} | <= {d['target_seconds']} | {d['ratio_to_forward_only']}x "
        f"the forward pass alone ({d['forward_only_seconds_estimated']} s) | "
        f"{d['peak_rss_gib']} GiB RSS (all activations: {d['all_activations_gib']} GiB) |",
        f"| (dashboards) latents never active over the pass | {d.get('never_active')} of "
        f"{d['latents']} ({d.get('never_active_frac', 0):.2%}) | | <= 5% | | |",
        f"| cards | {c['vectors']} vectors | {c['seconds']} | <= {c['target_seconds']} | "
        f"{c['ratio_to_generation_only']}x generating their completions alone "
        f"({c['generation_only_seconds']} s) | |",
        *_other_sae_rows(),
        "",
    ]


BENCH_22 = (
    "melbo-lens bench --explain --threads 2 --sae smollm2-135m-instruct-res22-pre "
    "--explain-tokens 1000000 --out results/res22-pre --overwrite"
)


def _other_sae_rows() -> list[str]:
    """Dead latents of the res22-pre SAE, from a shorter dashboards pass of its own."""
    path = ROOT / "results" / "res22-pre" / "bench_explain.json"
    if not path.is_file():
        return []
    d = json.loads(path.read_text())["dashboards"]
    return [
        f"| (dashboards of smollm2-135m-instruct-res22-pre, `{BENCH_22}`) latents never "
        f"active over {d['tokens']:,} tokens | {d['never_active']} of {d['latents']} "
        f"({d['never_active_frac']:.2%}) | {d['seconds']} | <= 5% dead | | "
        f"{d['peak_rss_gib']} GiB RSS |"
    ]


def cards_table() -> list[str]:
    path = ROOT / "results" / "cards_backdoored.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    rows = [
        f"**Cards on the backdoored SmolLM2** (`python scripts/cards_backdoored.py`; "
        f"`results/cards_backdoored.json`): a supervised vector of norm {r['radius']} per "
        "behaviour, its phrase rate on held-out clean prompts, and where the phrase's first "
        "token ranks among the card's promoted tokens (part (b), measured on corpus text, "
        "not on the arithmetic prompts):",
        "",
        "| behaviour | held-out phrase rate | first token | rank in promoted | top promoted |",
        "|---|---|---|---|---|",
    ]
    for name, b in r["behaviours"].items():
        top = ", ".join(_cell(t[0]) for t in b["card"]["promoted"][:5])
        rank = b["first_token_rank_in_promoted"]
        rows.append(
            f"| {name} | {b['heldout_rate']:.2f} | {_cell(b['first_token'])} | "
            f"{'not in top 10' if rank is None else rank} | {top} |"
        )
    return [*rows, ""]


def _cell(token: str) -> str:
    """A token as a table cell: its repr in code, with the table's bar escaped."""
    return "`" + repr(token).replace("|", "\\|") + "`"


def main() -> int:
    block = [START, "", *corpus_table(), *sae_table(), *bench_table(), *cards_table(), END]
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(head + "\n".join(block) + tail)
    print(f"-> {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
