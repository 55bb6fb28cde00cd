"""Train TopK SAEs for SmolLM2-135M-Instruct offline and measure them.

Reproduces the packaged SAEs under ``melbo_lens/data/saes/``:

1. **Corpus** (no network): English prose shipped by installed packages (PyPI
   ``METADATA`` long descriptions, ``.md``/``.rst``/``.txt`` docs and Python docstrings
   under the venv's site-packages, plain-text files under ``/usr/share/doc``), split into
   paragraphs, filtered to mostly-prose paragraphs, de-duplicated, capped per package;
   plus the model's own sampled generations from the bundled seed prompts
   (``bundled_prompts("varied")`` + ``("demo")``, chat-formatted). Documents (not
   paragraphs) are split 90/10 into train / held-out by a seeded shuffle.
2. **Activations**: documents are concatenated (``<|endoftext|>`` between them) and cut
   into contexts of ``--ctx`` tokens (no BOS prepended: SmolLM2's tokenizer adds none);
   one forward pass per batch, stopped after the last needed layer, collects every site.
   Position 0 of each context (attention-sink position, norm far above the rest) is
   **excluded** from training and from every metric; the SAE is spliced in at positions
   >= 1 only.
3. **Training**: sae-lens's own ``SAETrainer`` with ``TopKTrainingSAE`` (aux-k loss for
   dead latents, decoder-norm rescaling, ``expected_average_only_in`` input scaling folded
   into the weights at the end), fed from an in-memory activation buffer (the
   ``LanguageModelSAETrainingRunner`` builds its data from a HF dataset name, which needs
   the hub; the trainer takes any iterator of activation batches).
4. **Metrics** on held-out text: fraction of variance explained, L0, dead fraction (never
   active on the held-out tokens), and CE loss recovered with the reconstruction spliced
   in, against zero- and mean-ablation, at ``--ctx`` and at ``--long-ctx``.

Writes ``<out>/<name>/{cfg.json, sae_weights.safetensors (fp16), metrics.json}``.

    python scripts/train_saes.py                        # both default sites
    python scripts/train_saes.py --sites blocks.7.hook_resid_post --train-tokens 100000
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SITE_NAMES = {
    "blocks.7.hook_resid_post": "smollm2-135m-instruct-res7",
    "blocks.22.hook_resid_pre": "smollm2-135m-instruct-res22-pre",
}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------- corpus
_WORD = re.compile(r"[A-Za-z]+")


def is_prose(par: str) -> bool:
    """A paragraph that reads as English prose, not code, tables, or lists of names."""
    words = par.split()
    if len(words) < 12 or len(par) > 4000:
        return False
    if any(
        line.lstrip().startswith((">>>", "...", "$ ", "|", "+--", "::", ".. ", "#"))
        for line in par.splitlines()
    ):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in par)
    if letters / len(par) < 0.88:
        return False
    alpha_words = _WORD.findall(par)
    if len(alpha_words) < 0.8 * len(words):
        return False
    mean_len = sum(map(len, alpha_words)) / max(len(alpha_words), 1)
    if not 3.0 <= mean_len <= 8.0:
        return False
    common = {"the", "a", "of", "to", "and", "is", "in", "for", "that", "this", "it", "be"}
    if sum(w.lower() in common for w in alpha_words) < 0.08 * len(alpha_words):
        return False
    return True


def paragraphs(text: str) -> list[str]:
    out = []
    for par in re.split(r"\n\s*\n", text):
        par = " ".join(line.strip() for line in par.strip().splitlines())
        if is_prose(par):
            out.append(par)
    return out


def package_of(path: Path, site: Path) -> str:
    try:
        return path.relative_to(site).parts[0].split("-")[0].lower()
    except ValueError:
        return path.parts[4] if len(path.parts) > 4 else str(path.parent)


def collect_package_text(site: Path, per_package_chars: int) -> list[tuple[str, str]]:
    """(source, document) pairs; a document = the prose paragraphs of one file/docstring."""
    budget: dict[str, int] = {}
    docs: list[tuple[str, str]] = []

    def add(pkg: str, kind: str, text: str) -> None:
        used = budget.get(pkg, 0)
        if used >= per_package_chars:
            return
        pars = paragraphs(text)
        if not pars:
            return
        doc = "\n\n".join(pars)[: per_package_chars - used]
        budget[pkg] = used + len(doc)
        docs.append((f"{kind}:{pkg}", doc))

    # METADATA long descriptions (after the header block)
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        text = meta.read_text(errors="ignore")
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        add(package_of(meta, site), "metadata", body)
    # shipped docs
    for ext in ("*.md", "*.rst", "*.txt"):
        for f in sorted(site.rglob(ext)):
            if f.stat().st_size > 2_000_000 or "LICENSE" in f.name.upper():
                continue
            add(package_of(f, site), "doc", f.read_text(errors="ignore"))
    # /usr/share/doc: plain README-like files (no changelogs, no copyright files)
    for f in sorted(Path("/usr/share/doc").rglob("*")):
        name = f.name.lower()
        if not f.is_file() or "changelog" in name or "copyright" in name or "news" in name:
            continue
        try:
            raw = f.read_bytes()[:400_000]
            text = (
                gzip.decompress(raw).decode(errors="ignore")
                if name.endswith(".gz")
                else (raw.decode(errors="ignore"))
            )
        except (OSError, EOFError):
            continue
        add("usr-share-doc:" + f.parent.name, "sysdoc", text)
    # Python docstrings (module, class, function), one document per file
    for f in sorted(site.rglob("*.py")):
        pkg = package_of(f, site)
        if budget.get(pkg, 0) >= per_package_chars or "test" in f.parts[-2:][0].lower():
            continue
        try:
            tree = ast.parse(f.read_text(errors="ignore"))
        except (SyntaxError, ValueError, RecursionError):
            continue
        ds = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                d = ast.get_docstring(node)
                if d:
                    ds.append(d)
        if ds:
            add(pkg, "docstring", "\n\n".join(ds))
    return docs


def dedupe(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop paragraphs seen before (exact, case/space-normalised); drop emptied docs."""
    seen: set[str] = set()
    out = []
    for src, doc in docs:
        keep = []
        for par in doc.split("\n\n"):
            h = hashlib.sha1(" ".join(par.lower().split()).encode()).hexdigest()
            if h not in seen:
                seen.add(h)
                keep.append(par)
        if keep:
            out.append((src, "\n\n".join(keep)))
    return out


def generate_texts(model, n_samples: int, new_tokens: int, seed: int) -> list[str]:
    """The model's own chat completions (temperature 0.8 samples, plus one greedy each)."""
    from melbo_lens.cli import bundled_prompts

    prompts = bundled_prompts("varied") + bundled_prompts("demo")
    tok = model.tokenizer
    texts = []
    torch.manual_seed(seed)
    for p in prompts:
        chat = tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tok(chat, add_special_tokens=False)["input_ids"]])
        for greedy, n in ((True, 1), (False, n_samples)):
            if n == 0:
                continue
            out = model.generate(
                ids.expand(n, -1),
                max_new_tokens=new_tokens,
                do_sample=not greedy,
                temperature=0.8,
                top_p=0.95,
                verbose=False,
                stop_at_eos=True,
                use_past_kv_cache=True,
            )
            for row in out:
                texts.append(
                    tok.decode(row, skip_special_tokens=False).replace("<|endoftext|>", "").strip()
                )
    return texts


def build_corpus(model, args) -> dict:
    cache = Path(args.work) / "corpus.json"
    if cache.exists() and not args.rebuild:
        return json.loads(cache.read_text())
    site = Path(torch.__file__).resolve().parents[1]
    log(f"collecting package text under {site} and /usr/share/doc")
    docs = dedupe(collect_package_text(site, args.per_package_chars))
    log(f"  {len(docs)} documents, {sum(len(d) for _, d in docs):,} chars")
    gens = []
    if args.gen_samples >= 0:
        t = time.time()
        gens = generate_texts(model, args.gen_samples, args.gen_tokens, args.seed)
        log(f"  {len(gens)} generations in {time.time() - t:.0f}s")
    docs += [("generation", g) for g in gens]
    rng = random.Random(args.seed)
    rng.shuffle(docs)
    n_eval = max(1, int(round(args.eval_frac * len(docs))))
    corpus = {"eval": docs[:n_eval], "train": docs[n_eval:]}
    Path(args.work).mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(corpus))
    return corpus


def pack(model, docs: list[tuple[str, str]], ctx: int, max_tokens: int | None) -> torch.Tensor:
    """Concatenate documents with <|endoftext|> between them and cut into ctx-token rows."""
    tok = model.tokenizer
    sep = tok.eos_token_id
    stream: list[int] = []
    for _, doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [sep]
        if max_tokens is not None and len(stream) >= max_tokens + ctx:
            break
    n = len(stream) // ctx
    if max_tokens is not None:
        n = min(n, math.ceil(max_tokens / (ctx - 1)))
    return torch.tensor(stream[: n * ctx]).view(n, ctx)


# ---------------------------------------------------------------------- activations
def layer_of(hook: str) -> int:
    return int(hook.split(".")[1])


@torch.no_grad()
def collect(model, tokens: torch.Tensor, sites: list[str], batch: int) -> dict[str, torch.Tensor]:
    """Activations at positions >= 1, flattened to [rows*(ctx-1), d_model], fp16."""
    stop = max(layer_of(s) for s in sites) + 1
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}

    def grab(act, hook):
        out[hook.name].append(act[:, 1:].reshape(-1, act.shape[-1]).half())

    t = time.time()
    with model.hooks(fwd_hooks=[(s, grab) for s in sites]):
        for i in range(0, len(tokens), batch):
            model(tokens[i : i + batch], stop_at_layer=stop)
            if i == 0 or (i // batch) % 20 == 0:
                done = min(i + batch, len(tokens)) * tokens.shape[1]
                log(f"  activations: {done:,} tokens, {done / (time.time() - t):,.0f} tok/s")
    return {s: torch.cat(v) for s, v in out.items()}


# ---------------------------------------------------------------------- training
def train_one(acts: torch.Tensor, hook: str, args):
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    n = acts.shape[0]
    total = int(n * args.epochs) // args.batch * args.batch
    cfg = TopKTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=args.d_sae,
        k=args.k,
        normalize_activations="expected_average_only_in",
        aux_loss_coefficient=1.0,
        rescale_acts_by_decoder_norm=True,
        metadata=SAEMetadata(
            model_name="smollm2-135m-instruct",
            hook_name=hook,
            context_size=args.ctx,
            prepend_bos=False,
            seqpos_slice=(1, None),
            dataset_path="melbo_lens offline corpus",
        ),
    )
    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(cfg)
    steps = total // args.batch
    tcfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_warm_up_steps=min(50, steps // 10),
        lr_decay_steps=steps // 5,
        lr_end=0.0,
        dead_feature_window=max(50, min(1000, steps // 4)),
        feature_sampling_window=max(50, min(2000, steps // 4)),
        n_batches_for_norm_estimate=20,
    )

    def provider():
        g = torch.Generator().manual_seed(args.seed)
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - args.batch + 1, args.batch):
                yield acts[perm[i : i + args.batch]].float()

    trainer = SAETrainer(tcfg, sae, provider())
    t = time.time()
    sae = trainer.fit()
    train_s = time.time() - t
    log(f"  trained {hook}: {steps} steps x {args.batch} = {total:,} samples in {train_s:.0f}s")
    return sae, {
        "train_samples": total,
        "train_steps": steps,
        "train_seconds": train_s,
        "unique_train_tokens": n,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch,
    }


def save(sae, path: Path, metrics: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(path)
    wpath = path / "sae_weights.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(wpath).items()}, wpath)
    wpath.chmod(0o644)
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


# ---------------------------------------------------------------------- metrics
@torch.no_grad()
def recon_metrics(sae, acts: torch.Tensor, chunk: int = 8192) -> dict:
    acts = acts.float()
    mean = acts.mean(0)
    sse = sst = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, len(acts), chunk):
        x = acts[i : i + chunk]
        f = sae.encode(x)
        xh = sae.decode(f)
        sse += float(((x - xh) ** 2).sum())
        sst += float(((x - mean) ** 2).sum())
        l0 += float((f != 0).sum())
        fired |= (f != 0).any(0)
    return {
        "fve": 1 - sse / sst,
        "l0": l0 / len(acts),
        "dead_frac": 1 - float(fired.float().mean()),
        "n_tokens": len(acts),
    }


@torch.no_grad()
def ce_metrics(
    model, tokens: torch.Tensor, hook: str, sae, mean_act: torch.Tensor, batch: int
) -> dict:
    """Mean next-token CE over predictions at positions >= 1 (targets 2..) under splices."""

    def loss(fn) -> float:
        tot, cnt = 0.0, 0
        for i in range(0, len(tokens), batch):
            tk = tokens[i : i + batch]
            hooks = [] if fn is None else [(hook, fn)]
            logits = model.run_with_hooks(tk, fwd_hooks=hooks)
            lp = torch.log_softmax(logits[:, 1:-1].float(), -1)
            nll = -lp.gather(-1, tk[:, 2:, None])[..., 0]
            tot += float(nll.sum())
            cnt += nll.numel()
        return tot / cnt

    def splice(act, hook):
        x = act[:, 1:]
        act[:, 1:] = sae.decode(sae.encode(x.float())).to(act.dtype)
        return act

    def zero(act, hook):
        act[:, 1:] = 0
        return act

    def meanab(act, hook):
        act[:, 1:] = mean_act.to(act.dtype)
        return act

    clean, with_sae, z, m = loss(None), loss(splice), loss(zero), loss(meanab)
    return {
        "ce_clean": clean,
        "ce_sae": with_sae,
        "ce_zero_ablation": z,
        "ce_mean_ablation": m,
        "ce_recovered_zero": (z - with_sae) / (z - clean),
        "ce_recovered_mean": (m - with_sae) / (m - clean),
        "ce_delta": with_sae - clean,
        "n_tokens": int(tokens.numel()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", nargs="+", default=list(SITE_NAMES))
    ap.add_argument("--train-tokens", type=int, default=300_000)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--long-ctx", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="per context length")
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--fwd-batch", type=int, default=16)
    ap.add_argument("--per-package-chars", type=int, default=60_000)
    ap.add_argument(
        "--gen-samples",
        type=int,
        default=-1,
        help="chat generations per seed prompt; -1: none (slow on CPU)",
    )
    ap.add_argument("--gen-tokens", type=int, default=160)
    ap.add_argument("--eval-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", default="/tmp/melbo_sae_work")
    ap.add_argument("--out", default=str(ROOT / "melbo_lens" / "data" / "saes"))
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached corpus")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from melbo_lens.models.zoo import load_model

    model = load_model("smollm2-135m-instruct")
    model.eval()
    corpus = build_corpus(model, args)
    for split in ("train", "eval"):
        docs = corpus[split]
        kinds: dict[str, int] = {}
        for src, d in docs:
            kinds[src.split(":")[0]] = kinds.get(src.split(":")[0], 0) + len(d)
        log(f"{split}: {len(docs)} docs, chars by kind {kinds}")

    train_tok = pack(model, corpus["train"], args.ctx, args.train_tokens)
    eval_short = pack(model, corpus["eval"], args.ctx, args.eval_tokens)
    eval_long = pack(model, corpus["eval"], args.long_ctx, args.eval_tokens)
    log(
        f"train {tuple(train_tok.shape)}, eval {tuple(eval_short.shape)} / {tuple(eval_long.shape)}"
    )
    t = time.time()
    acts = collect(model, train_tok, args.sites, args.fwd_batch)
    collect_s = time.time() - t
    ev_short = collect(model, eval_short, args.sites, args.fwd_batch)
    ev_long = collect(model, eval_long, args.sites, max(1, args.fwd_batch // 4))
    corpus_info = {
        "train_docs": len(corpus["train"]),
        "eval_docs": len(corpus["eval"]),
        "train_contexts": int(train_tok.shape[0]),
        "ctx": args.ctx,
        "eval_tokens_short": int(eval_short.numel()),
        "eval_tokens_long": int(eval_long.numel()),
        "activation_seconds": collect_s,
        "position_0_excluded": True,
    }
    table = []
    for hook in args.sites:
        sae, train_info = train_one(acts[hook], hook, args)
        inf = sae  # evaluate the trained SAE (normalisation already folded by fit())
        inf.eval()
        mean_act = acts[hook].float().mean(0)
        m = {
            "site": hook,
            "architecture": "topk",
            "d_sae": args.d_sae,
            "k": args.k,
            "train": train_info,
            "corpus": corpus_info,
        }
        m[f"recon_ctx{args.ctx}"] = recon_metrics(inf, ev_short[hook])
        m[f"recon_ctx{args.long_ctx}"] = recon_metrics(inf, ev_long[hook])
        # positions beyond the training length, at the long context
        per_row = args.long_ctx - 1
        idx = torch.arange(len(ev_long[hook])) % per_row
        m[f"recon_ctx{args.long_ctx}_pos>={args.ctx}"] = recon_metrics(
            inf, ev_long[hook][idx >= args.ctx - 1]
        )
        t = time.time()
        m[f"ce_ctx{args.ctx}"] = ce_metrics(model, eval_short, hook, inf, mean_act, args.fwd_batch)
        m[f"ce_ctx{args.long_ctx}"] = ce_metrics(
            model, eval_long, hook, inf, mean_act, max(1, args.fwd_batch // 4)
        )
        log(f"  CE metrics in {time.time() - t:.0f}s")
        save(inf, Path(args.out) / SITE_NAMES.get(hook, hook.replace(".", "_")), m)
        table.append(m)
        log(json.dumps(m, indent=1))
        del sae

    hdr = (
        f"{'site':<26} {'ctx':>4} {'FVE':>6} {'L0':>5} {'dead':>6} {'CE clean':>8} "
        f"{'CE sae':>7} {'CE zero':>7} {'CE mean':>7} {'rec0':>6} {'recM':>6}"
    )
    print(hdr)
    for m in table:
        for c in (args.ctx, args.long_ctx):
            r, ce = m[f"recon_ctx{c}"], m[f"ce_ctx{c}"]
            print(
                f"{m['site']:<26} {c:>4} {r['fve']:>6.3f} {r['l0']:>5.1f} {r['dead_frac']:>6.3f} "
                f"{ce['ce_clean']:>8.3f} {ce['ce_sae']:>7.3f} {ce['ce_zero_ablation']:>7.3f} "
                f"{ce['ce_mean_ablation']:>7.3f} {ce['ce_recovered_zero']:>6.3f} "
                f"{ce['ce_recovered_mean']:>6.3f}"
            )
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
