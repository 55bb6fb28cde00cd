"""Train TopK SAEs for SmolLM2-135M-Instruct on the offline corpus, resumably, and measure them.

Reproduces the packaged SAEs under ``melbo_lens/data/saes/``:

1. **Corpus**: `load_corpus("melbo-chat-prose")` (built offline by `melbo-lens corpus
   build`: package prose, the same prose as chat conversations in SmolLM2's template, and
   clean arithmetic chats). Train on its ``train`` split; measure on ``heldout``.
2. **Activations**: the train split's token stream cut into rows of ``--ctx`` tokens; one
   forward pass per batch, stopped after the last needed layer. Position 0 of each row
   (the attention sink, norm far above the rest) is excluded from training and from every
   metric; the SAE is spliced in at positions >= 1 only. Activations are cached in
   ``--work`` as fp16 safetensors shards, written atomically, so a stopped run resumes
   from the last finished shard.
3. **Training**: sae-lens's own ``SAETrainer`` with ``TopKTrainingSAE`` (aux-k loss for
   dead latents, decoder-norm rescaling, ``expected_average_only_in`` input scaling folded
   into the weights at the end), fed from the cached activations. Every
   ``--checkpoint-every`` samples the SAE weights, Adam's state and the trainer's counters
   are written to ``--work`` (safetensors + JSON; sae-lens's own trainer checkpoint is a
   torch pickle, which melbo_lens never reads back), and a rerun continues from there.
4. **Metrics** on held-out text, prose and chat apart, at ``--ctx`` and at ``--long-ctx``:
   fraction of variance explained, L0, dead fraction (never active on the held-out
   tokens), and the next-token cross-entropy with the reconstruction spliced in, against
   zero- and mean-ablation ("CE loss recovered" as SAELens's evals compute it).

Writes ``<out>/<name>/{cfg.json, sae_weights.safetensors (fp16), metrics.json}``.

    python scripts/train_saes.py --sites blocks.7.hook_resid_post --threads 2
    python scripts/train_saes.py            # both default sites
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melbo_lens.core.io import atomic_save_tensors, atomic_write_text  # noqa: E402

SITE_NAMES = {
    "blocks.7.hook_resid_post": "smollm2-135m-instruct-res7",
    "blocks.22.hook_resid_pre": "smollm2-135m-instruct-res22-pre",
}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def layer_of(hook: str) -> int:
    return int(hook.split(".")[1])


# ---------------------------------------------------------------------- activations
@torch.no_grad()
def collect(model, rows: torch.Tensor, sites: list[str], batch: int, work: Path, tag: str):
    """Activations at positions >= 1 as [rows*(ctx-1), d_model] fp16, per site; cached in
    shards of `shard_rows` rows, so a stopped collection resumes at the next shard."""
    shard_rows = batch * 32
    stop = max(layer_of(s) for s in sites) + 1
    shards: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    t = time.time()
    for start in range(0, len(rows), shard_rows):
        path = work / f"acts-{tag}-{start:08d}.safetensors"
        if path.is_file():
            got = load_file(path)
        else:
            got_lists: dict[str, list[torch.Tensor]] = {s: [] for s in sites}

            def grab(act, hook, store=got_lists):
                store[hook.name].append(act[:, 1:].reshape(-1, act.shape[-1]).half())

            with model.hooks(fwd_hooks=[(s, grab) for s in sites]):
                for i in range(start, min(start + shard_rows, len(rows)), batch):
                    model(rows[i : i + batch], stop_at_layer=stop)
            got = {s: torch.cat(v) for s, v in got_lists.items()}
            atomic_save_tensors(got, path, {"format": "melbo_lens.sae_acts/1"})
            done = min(start + shard_rows, len(rows)) * rows.shape[1]
            log(f"  activations {tag}: {done:,} tokens, {done / (time.time() - t):,.0f} tok/s")
        for s in sites:
            shards[s].append(got[s])
    return {s: torch.cat(v) for s, v in shards.items()}


# ---------------------------------------------------------------------- training
def _state_paths(work: Path, hook: str) -> tuple[Path, Path]:
    stem = work / f"ckpt-{hook}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_state(trainer, work: Path, hook: str) -> None:
    """SAE weights, Adam's moments and the trainer's tensors in safetensors; counters in JSON."""
    tensors = {f"sae.{k}": v for k, v in trainer.sae.state_dict().items()}
    names = {id(p): n for n, p in trainer.sae.named_parameters()}
    steps = {}
    for p, st in trainer.optimizer.state.items():
        n = names[id(p)]
        tensors[f"adam.{n}.exp_avg"] = st["exp_avg"]
        tensors[f"adam.{n}.exp_avg_sq"] = st["exp_avg_sq"]
        steps[n] = float(st["step"])
    for k in ("act_freq_scores", "n_forward_passes_since_fired"):
        tensors[f"trainer.{k}"] = getattr(trainer, k)
    wpath, jpath = _state_paths(work, hook)
    atomic_save_tensors(tensors, wpath, {"format": "melbo_lens.sae_ckpt/1"})
    meta = {
        "n_training_samples": trainer.n_training_samples,
        "n_training_steps": trainer.n_training_steps,
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "adam_steps": steps,
        "scaling_factor": trainer.activation_scaler.scaling_factor,
    }
    atomic_write_text(jpath, json.dumps(meta))
    log(f"  checkpoint {hook}: {trainer.n_training_samples:,} samples")


def load_state(trainer, work: Path, hook: str) -> bool:
    wpath, jpath = _state_paths(work, hook)
    if not (wpath.is_file() and jpath.is_file()):
        return False
    meta = json.loads(jpath.read_text())
    tensors = load_file(wpath)
    trainer.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    params = dict(trainer.sae.named_parameters())
    for n, p in params.items():
        if f"adam.{n}.exp_avg" in tensors:
            trainer.optimizer.state[p] = {
                "step": torch.tensor(meta["adam_steps"][n]),
                "exp_avg": tensors[f"adam.{n}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"].clone(),
            }
    for k in ("act_freq_scores", "n_forward_passes_since_fired"):
        setattr(trainer, k, tensors[f"trainer.{k}"].clone())
    trainer.n_training_samples = meta["n_training_samples"]
    trainer.n_training_steps = meta["n_training_steps"]
    trainer.n_frac_active_samples = meta["n_frac_active_samples"]
    trainer.activation_scaler.scaling_factor = meta["scaling_factor"]
    for _ in range(trainer.n_training_steps):  # schedules are functions of the step
        trainer.lr_scheduler.step()
        for sched in trainer.coefficient_schedulers.values():
            sched.step()
    log(f"  resumed {hook} at {trainer.n_training_samples:,} samples")
    return True


def train_one(acts: torch.Tensor, hook: str, args, work: Path):
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
            model_name="HuggingFaceTB/SmolLM2-135M-Instruct",  # the HF / TransformerLens name
            hook_name=hook,
            context_size=args.ctx,
            prepend_bos=False,
            seqpos_slice=(1, None),
            dataset_path="melbo_lens corpus melbo-chat-prose (train split)",
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
    trainer = SAETrainer(tcfg, sae, iter(()))
    resumed = load_state(trainer, work, hook)

    def provider(skip_steps: int):
        g = torch.Generator().manual_seed(args.seed)
        step = 0
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - args.batch + 1, args.batch):
                if step >= skip_steps:
                    yield acts[perm[i : i + args.batch]].float()
                step += 1

    # the norm estimate reads batches from the provider's start; on resume it is loaded
    trainer.data_provider = provider(trainer.n_training_steps if resumed else 0)
    every = max(args.batch, args.checkpoint_every // args.batch * args.batch)
    t = time.time()
    # sae-lens's fit() runs to total; run it in legs of `every` samples with a save between
    while trainer.n_training_samples < total:
        _fit_leg(trainer, min(total, trainer.n_training_samples + every))
        if trainer.n_training_samples < total:
            save_state(trainer, work, hook)
    sae = _finish(trainer)
    train_s = time.time() - t
    log(f"  trained {hook}: {steps} steps x {args.batch} = {total:,} samples in {train_s:.0f}s")
    return sae, {
        "train_samples": total,
        "train_steps": steps,
        "train_seconds_last_leg_run": train_s,
        "unique_train_tokens": n,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch,
    }


def _fit_leg(trainer, until: int) -> None:
    """sae-lens's training loop (`SAETrainer.fit`) up to `until` samples, without its end."""
    if (
        trainer.sae.cfg.normalize_activations == "expected_average_only_in"
        and trainer.activation_scaler.scaling_factor is None
    ):
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=trainer.sae.cfg.d_in,
            data_provider=trainer.data_provider,
            n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate,
        )
    while trainer.n_training_samples < until:
        trainer.maybe_reset_sparsity()
        trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1


def _finish(trainer):
    """What sae-lens's fit() does after its loop: fold the input scaling into the weights."""
    trainer.set_final_sae_metadata()
    if trainer.sae.cfg.normalize_activations == "expected_average_only_in":
        trainer.sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None
    return trainer.sae


def save(sae, path: Path, metrics: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(path)
    wpath = path / "sae_weights.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(wpath).items()}, wpath)
    wpath.chmod(0o644)
    atomic_write_text(path / "metrics.json", json.dumps(metrics, indent=2) + "\n")


# ---------------------------------------------------------------------- metrics
@torch.no_grad()
def recon_metrics(sae, acts: torch.Tensor, chunk: int = 8192) -> dict:
    acts = acts.float()
    mean = acts.mean(0)
    sse = sst = l0 = 0.0
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
def ce_metrics(model, tokens: torch.Tensor, hook: str, sae, mean_act, batch: int) -> dict:
    """Mean next-token CE over predictions at positions >= 1 under splices at `hook`."""

    def loss(fn) -> float:
        tot, cnt = 0.0, 0
        for i in range(0, len(tokens), batch):
            tk = tokens[i : i + batch]
            logits = model.run_with_hooks(tk, fwd_hooks=[] if fn is None else [(hook, fn)])
            lp = torch.log_softmax(logits[:, 1:-1].float(), -1)
            nll = -lp.gather(-1, tk[:, 2:, None])[..., 0]
            tot += float(nll.sum())
            cnt += nll.numel()
        return tot / cnt

    def splice(act, hook):
        act[:, 1:] = sae.decode(sae.encode(act[:, 1:].float())).to(act.dtype)
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
    ap.add_argument("--corpus", default="melbo-chat-prose")
    ap.add_argument("--train-tokens", type=int, default=None, help="default: the whole split")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--long-ctx", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="per kind and context")
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--fwd-batch", type=int, default=16)
    ap.add_argument("--checkpoint-every", type=int, default=250_000, help="samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", default="/tmp/melbo_sae_work")
    ap.add_argument("--out", default=str(ROOT / "melbo_lens" / "data" / "saes"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from melbo_lens.analysis.corpus import Corpus, load_corpus
    from melbo_lens.models.zoo import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2-135m-instruct")
    model.eval()
    tok = model.tokenizer
    corpus = load_corpus(args.corpus)
    train_rows = corpus.split("train").token_rows(tok, args.ctx, max_tokens=args.train_tokens)
    held = corpus.split("heldout")
    by_kind = {
        kind: Corpus([d for d in held.documents if d.kind == kind], f"heldout-{kind}")
        for kind in ("prose", "chat")
    }
    evals = {
        (kind, ctx): c.token_rows(tok, ctx, max_tokens=args.eval_tokens)
        for kind, c in by_kind.items()
        for ctx in (args.ctx, args.long_ctx)
    }
    log(f"train rows {tuple(train_rows.shape)}; eval {[tuple(v.shape) for v in evals.values()]}")
    t = time.time()
    acts = collect(model, train_rows, args.sites, args.fwd_batch, work, f"train{args.ctx}")
    collect_s = time.time() - t
    ev = {
        key: collect(
            model,
            rows,
            args.sites,
            max(1, args.fwd_batch * args.ctx // key[1]),
            work,
            f"{key[0]}{key[1]}",
        )
        for key, rows in evals.items()
    }
    corpus_info = {
        "name": corpus.name,
        "sha256": corpus.provenance.get("sha256"),
        "train_rows": int(train_rows.shape[0]),
        "ctx": args.ctx,
        "eval_tokens": {f"{k}{c}": int(v.numel()) for (k, c), v in evals.items()},
        "activation_seconds_this_run": collect_s,
        "position_0_excluded": True,
    }
    for hook in args.sites:
        dest = Path(args.out) / SITE_NAMES.get(hook, hook.replace(".", "_"))
        sae, train_info = train_one(acts[hook], hook, args, work)
        sae.eval()
        mean_act = acts[hook].float().mean(0)
        m = {
            "site": hook,
            "architecture": "topk",
            "d_sae": args.d_sae,
            "k": args.k,
            "train": train_info,
            "corpus": corpus_info,
        }
        for (kind, ctx), rows in evals.items():
            m[f"recon_{kind}_ctx{ctx}"] = recon_metrics(sae, ev[(kind, ctx)][hook])
            batch = max(1, args.fwd_batch * args.ctx // ctx)
            m[f"ce_{kind}_ctx{ctx}"] = ce_metrics(model, rows, hook, sae, mean_act, batch)
        save(sae, dest, m)
        log(json.dumps(m, indent=1))
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
