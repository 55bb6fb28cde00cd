"""Options and helpers shared by the CLI's subcommands: sites, prompts, training flags.

Every subcommand module imports from here, never from `melbo_lens.cli` itself, so the
package has no import cycle. Errors raised here are `CliError`s: their messages name
the flag, the value and the fix in command-line terms.

Why one module over ~400 lines: the flags every subcommand shares and their parsing into
configs, in one place so the commands agree.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import POSITION_SPECS, bundled_prompts, parse_positions
from melbo_lens.methods.training.objective import OBJECTIVES, reads_logits

DEFAULT_MODEL = "smollm2-135m-instruct"


class CliError(ValueError):
    """A bad command line: the message names the flag, the value and the fix."""


# config field -> the flag that sets it (used to name differing fields on --resume)
FLAG_OF = {
    "source": "--source",
    "source_layer": "--source",
    "target": "--target",
    "n_vectors": "--n-vectors",
    "n_adapters": "--n-vectors",
    "rank": "--rank",
    "radius": "--radius",
    "power": "--power",
    "q": "--q",
    "steps": "--steps",
    "lr": "--lr",
    "orthogonal": "--orthogonal",
    "objective": "--objective",
    "consistency_weight": "--consistency-weight",
    "on_manifold": "--on-manifold",
    "normalization": "--normalization",
    "position_quantile": "--position-quantile",
    "solver": "--solver",
    "seed": "--seed",
    "prompts": "--prompt/--prompts-file",
    "target_positions": "--target-positions",
    "model": "--model",
}


# ---------------------------------------------------------------------- value types
def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text}")
    return value


def auto_or_int(minimum: int) -> Callable[[str], int | str]:
    """argparse type: 'auto' or an int >= `minimum`."""

    def parse(text: str) -> int | str:
        if text == "auto":
            return "auto"
        value = _int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= {minimum}, got {text}")
        return value

    return parse


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**32)."""
    value = _int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**32), got {text}")
    return value


def rows_limit(text: str) -> int | str:
    """argparse type: 'auto' or an int >= 1."""
    return "auto" if text == "auto" else positive_int(text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def auto_or_positive_float(text: str) -> float | str:
    """argparse type: 'auto' or a finite number > 0."""
    return "auto" if text == "auto" else positive_float(text)


def auto_or_fraction(text: str) -> float | str:
    """argparse type: 'auto' or a number in [0, 1)."""
    if text == "auto":
        return "auto"
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number in [0, 1), got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None


# ---------------------------------------------------------------------- sites, prompts
def parse_site_option(value: str, default_point: str):
    from melbo_lens.core.sites import parse_site

    return parse_site(value, default_point)


def site_or_auto(value: str, default_point: str):
    """A site, or None for 'auto' (the method's default, `methods.defaults`)."""
    return None if value == "auto" else parse_site_option(value, default_point)


def sites_option(args: argparse.Namespace, model: Host, source_point: str = "resid_post"):
    """(source, target) from --source / --target, 'auto' resolved by depth for `model`."""
    from melbo_lens.core.host import n_layers_of
    from melbo_lens.methods.defaults import default_sites

    auto = default_sites(n_layers_of(model))
    source = site_or_auto(args.source, source_point) or auto[0]
    target = site_or_auto(args.target, "resid_post") or auto[1]
    return source, target


def read_list(path_str: str, flag: str) -> list[Any]:
    """Prompts from a .txt (one per non-blank line) or .json file (a list, or an object
    with a "prompts" list); each JSON entry a string or a conversation."""
    path = Path(path_str)
    if not path.is_file():
        raise CliError(f"{flag} {path_str}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CliError(
            f"{flag} {path_str}: not UTF-8 text (byte {err.start}: {err.reason}); give a .txt "
            "with one prompt per line or a .json list"
        ) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CliError(f"{flag} {path_str}: not valid JSON ({err})") from None
        if isinstance(data, dict):
            if "prompts" not in data:
                raise CliError(
                    f'{flag} {path_str}: a JSON object needs a "prompts" list (found keys '
                    f"{sorted(data)}); or make the file a JSON list of prompts"
                )
            data = data["prompts"]
        if not isinstance(data, list):
            raise CliError(f"{flag} {path_str}: expected a JSON list of prompts")
        prompts = data
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CliError(
            f"{flag} {path_str}: no prompts in the file (only blank lines or an empty list); "
            "give one prompt per line"
        )
    return prompts


def read_prompts(args: argparse.Namespace) -> list[Any]:
    """--prompt (repeatable) and --prompts-file; the bundled demo prompts if neither."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_list(args.prompts_file, "--prompts-file")
    if not prompts:
        prompts = bundled_prompts("demo")
    return prompts


TARGET_POSITIONS_HELP = POSITION_SPECS


def target_positions_option(spec: str):
    """--target-positions -> a target-position spec of `PromptSet`."""
    try:
        return parse_positions(spec)
    except ValueError as err:
        raise CliError(f"--target-positions {err}") from None


def prompt_set(model: Host, prompts: list[Any], chat: bool, target_spec: str):
    from melbo_lens.core.prompts import PromptSet

    positions = target_positions_option(target_spec)
    tokenizer = getattr(model, "tokenizer", None)
    wants_template = chat or any(not isinstance(p, str) for p in prompts)
    if wants_template and getattr(tokenizer, "chat_template", None) is None:
        raise CliError(
            "this model's tokenizer has no chat template; pass --no-chat to use the prompts "
            "as plain text (conversations in a prompts file need a chat model)"
        )
    return PromptSet.coerce(model, prompts, chat=chat, target_positions=positions)


def training_prompts(model: Host, prompts: list[Any], args: argparse.Namespace):
    """The prompts a training command trains on: with --objective logprob or neg-logprob,
    each prompt followed by its --continuation (teacher forcing), else `prompt_set`."""
    from melbo_lens.core.prompts import PromptSet

    continuations = getattr(args, "continuation", None)
    objective = getattr(args, "objective", "melbo")
    if not reads_logits(objective):
        if continuations:
            raise CliError(
                f"--continuation is the answer --objective logprob (or neg-logprob) scores; "
                f"with --objective {objective} drop it"
            )
        return prompt_set(model, prompts, not args.no_chat, args.target_positions)
    if not continuations:
        raise CliError(
            f"--objective {objective} scores an answer: give it with --continuation TEXT (one "
            "for all prompts, or one per prompt)"
        )
    if args.target_positions != "auto":
        raise CliError(
            f"--objective {objective} scores the --continuation tokens; drop --target-positions"
        )
    texts = continuations[0] if len(continuations) == 1 else continuations
    try:
        return PromptSet.with_continuations(model, prompts, texts, chat=not args.no_chat)
    except ValueError as err:
        raise CliError(f"--continuation: {err}") from None


# ---------------------------------------------------------------------- option groups
def add_prompt_args(p: argparse.ArgumentParser | Any, *, positions: bool = True) -> None:
    """--prompt, --prompts-file, --no-chat (and --target-positions)."""
    g = p.add_argument_group("prompts") if isinstance(p, argparse.ArgumentParser) else p
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument(
        "--prompts-file",
        help='a .txt (one prompt per line) or .json (a list, or {"prompts": [...]}; entries '
        "are strings or chat conversations); default: the bundled demo prompts",
    )
    g.add_argument(
        "--no-chat",
        action="store_true",
        help="use prompts as plain text, without the chat template",
    )
    if positions:
        g.add_argument(
            "--target-positions",
            default="auto",
            help=f"positions where the change is measured: {TARGET_POSITIONS_HELP}",
        )


def add_training_args(p: argparse.ArgumentParser, *, n_vectors: int) -> None:
    """The options every MELBO-training command shares, in groups."""
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a packaged name (works offline) or a TransformerLens / Hugging Face name",
    )
    m.add_argument("--bridge", action="store_true", help="use TransformerBridge as the host")
    add_prompt_args(p)
    t = p.add_argument_group("training (MELBO vectors and adapters)")
    t.add_argument(
        "--source",
        default="auto",
        help="where the perturbation is added: a layer (resid_post) or a hook name; 'auto': "
        "the residual stream entering block n_layers/4",
    )
    t.add_argument(
        "--target",
        default="auto",
        help="where the change is measured: a layer (resid_post) or a hook name; 'auto': "
        "entering block 3 n_layers/4",
    )
    t.add_argument(
        "--radius",
        type=auto_or_positive_float,
        default="auto",
        help="R, the norm of each vector; 'auto': searched before training, at the "
        "diversity/fluency cusp on a grid scaled to the source's residual norm",
    )
    t.add_argument(
        "--power", type=positive_float, default=2.0, help="p: per-position change ||Δ||^p"
    )
    t.add_argument(
        "--q", type=positive_float, default=1.0, help="q: per-prompt sum to the power 1/q"
    )
    t.add_argument(
        "--n-vectors", type=positive_int, default=n_vectors, help="how many vectors to train"
    )
    t.add_argument(
        "--steps",
        type=auto_or_int(0),
        default="auto",
        help="steps of the first vector (with --starts-per-vector 1: of every vector); "
        "'auto': 40 with the power solver, 300 with AMSGrad",
    )
    t.add_argument(
        "--starts-per-vector",
        type=auto_or_int(1),
        default="auto",
        help="candidate starts trained together for each sequential vector ('auto': 8; "
        "1: one start per vector, the source's way)",
    )
    t.add_argument(
        "--slot-steps",
        type=auto_or_int(1),
        default="auto",
        help="steps between later vectors of a window of starts ('auto': 10 power, 60 AMSGrad)",
    )
    t.add_argument(
        "--slot-tol",
        type=auto_or_fraction,
        default="auto",
        help="a window's slot ends once its best objective rose by at most this fraction over "
        "2 steps ('auto': 1e-3 power, 0 AMSGrad; 0: run every step)",
    )
    t.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default="melbo",
        help="what each vector maximises: MELBO's change at the target, the consistency of "
        "that change across prompts (mean pairwise cosine; needs >= 2 prompts), both, or "
        "the log-probability of --continuation (logprob: make it likely; neg-logprob: unlikely)",
    )
    t.add_argument(
        "--continuation",
        action="append",
        help="with --objective logprob / neg-logprob: the answer whose log-probability is "
        "raised / lowered "
        "(repeatable: one for all prompts, or one per prompt)",
    )
    t.add_argument(
        "--consistency-weight",
        type=positive_float,
        default=1.0,
        help="weight of the consistency term in --objective melbo+consistency",
    )
    t.add_argument(
        "--on-manifold",
        type=positive_int,
        default=None,
        metavar="K",
        help="vectors only: keep each vector in the span of the top-K right singular vectors "
        "of the prompts' source activations (the data manifold)",
    )
    t.add_argument("--lr", default="auto", help="'auto' (0.011·R/√d_model) or a number")
    t.add_argument(
        "--orthogonal",
        default=None,
        choices=["sequential", "simultaneous", "soft", "none"],
        help="how vectors are kept apart; default: sequential (vectors), none (adapters)",
    )
    t.add_argument(
        "--solver",
        default="auto",
        choices=["auto", "amsgrad", "power"],
        help="AMSGrad on the sphere (the source's) or a safeguarded power step; 'auto': "
        "power for a window of starts, AMSGrad otherwise",
    )
    t.add_argument("--seed", type=seed_int, default=0, help="seed of the initial vectors")
    t.add_argument(
        "--max-rows-per-pass",
        type=rows_limit,
        default=None,
        help="split each step into passes of at most this many rows (vectors x prompts), "
        "accumulating gradients: less memory, same result; 'auto' fits the free memory "
        "(default: one pass)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default="melbo_out", help="output directory")
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out (same settings)",
    )
    o.add_argument(
        "--overwrite", action="store_true", help="replace a finished run already in --out"
    )
    o.add_argument(
        "--max-new-tokens",
        type=nonnegative_int,
        default=40,
        help="tokens generated per completion",
    )
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def lr_option(value: str) -> float | Literal["auto"]:
    if value == "auto":
        return "auto"
    try:
        return finite_float(value)
    except argparse.ArgumentTypeError:
        raise CliError(f"--lr must be 'auto' or a number, got {value!r}") from None


def melbo_config(args: argparse.Namespace, radius: Any):
    """The MelboConfig that the shared training options (`add_training_args`) describe."""
    from melbo_lens.methods.melbo import MelboConfig

    return MelboConfig(
        source=site_or_auto(args.source, "resid_post"),
        target=site_or_auto(args.target, "resid_post"),
        n_vectors=args.n_vectors,
        radius=radius,
        power=args.power,
        q=args.q,
        steps=args.steps,
        lr=lr_option(args.lr),
        orthogonal=args.orthogonal or "sequential",
        solver=args.solver,
        seed=args.seed,
        starts_per_vector=args.starts_per_vector,
        slot_steps=args.slot_steps,
        slot_tol=args.slot_tol,
        objective=args.objective,
        consistency_weight=args.consistency_weight,
        on_manifold=getattr(args, "on_manifold", None),
    )


def train_vectors(args: argparse.Namespace, prompts: list[Any], path: Path, resume: str | None):
    """Train MELBO vectors into `path` (claimed by the caller with `claimed_output`)."""
    from melbo_lens.methods.melbo import train_steering_vectors
    from melbo_lens.models.zoo import load_model

    model = load_model(args.model, bridge=args.bridge)
    ps = training_prompts(model, prompts, args)
    config = melbo_config(args, args.radius)
    vectors, seconds = train_checkpointed(
        train_steering_vectors, model, ps, config, args, path, resume
    )
    return model, ps, vectors, path, seconds


def train_checkpointed(train_fn, model, ps, config, args, path: Path, resume: str | None):
    """Run a `train_*` function with the CLI's checkpoint, resume and memory options,
    save the result at `path` (claimed by the caller); (artifact, seconds)."""
    if not args.quiet:
        print(training_plan(config), flush=True)
    start = time.perf_counter()
    artifact = train_fn(
        model,
        ps,
        config,
        progress=not args.quiet,
        checkpoint=str(path),
        resume=resume,
        overwrite=True,  # claimed_output has checked --overwrite / --resume
        max_rows_per_pass=args.max_rows_per_pass,
    )
    artifact.metadata["load_name"] = args.model
    artifact.save(path)
    return artifact, time.perf_counter() - start


def training_plan(config: Any) -> str:
    """One line saying how a config trains, with its "auto" values resolved."""
    noun = "adapter" if hasattr(config, "n_adapters") else "vector"
    if hasattr(config, "n_prompts"):
        noun = "soft prompt"
    n = getattr(config, "n_adapters", getattr(config, "n_vectors", getattr(config, "n_prompts", 0)))
    if config.windowed:
        how = (
            f"each the best of a window of {config.starts} starts, {config.loop_solver()} "
            f"solver, {config.loop_steps()} steps for the first and "
            f"{config.loop_slot_steps()} more for each later one"
            + (
                f", a slot ending once its best rises < {config.loop_slot_tol():g} over 2 steps"
                if config.loop_slot_tol()
                else ""
            )
        )
    else:
        how = f"{config.loop_solver()} solver, {config.loop_steps()} steps each"
    radius = "auto" if config.radius == "auto" else f"{config.radius:g}"
    source = getattr(config, "source", None)
    sites = (
        "auto sites"
        if source is None or config.target is None
        else (f"{source.name} -> {config.target.name}")
    )
    return f"training {n} {noun}s ({config.orthogonal}), R = {radius}, {sites}: {how}"


def print_vectors(vectors) -> None:
    from melbo_lens.methods.defaults import describe_defaults

    for name, line in describe_defaults(vectors.metadata).items():
        print(f"{name}: {line}")
    print(f"{'vector':>6}  {'objective':>12}  {'steps':>5}")
    for k in range(len(vectors)):
        obj = float(vectors.objective[k]) if vectors.objective is not None else float("nan")
        steps = int(vectors.steps_done[k]) if vectors.steps_done is not None else -1
        print(f"{k:>6}  {obj:>12.5g}  {steps:>5}")


SUPERVISED: dict[str, Literal["mean_difference", "pca", "probe"]] = {
    "mean-diff": "mean_difference",
    "pca": "pca",
    "probe": "probe",
}
BASELINES = ("random", "jacobian", "hessian")


def add_corpus_arg(p: argparse.ArgumentParser) -> None:
    """`--corpus NAME_OR_FILE`: the text explanations read (dashboards, cards)."""
    p.add_argument(
        "--corpus",
        default="melbo-chat-prose",
        help="corpus for dashboards and cards: a name (built offline on first use), a "
        ".jsonl/.jsonl.gz/.txt file, or 'prompts' (the bundled prompts, ~100 tokens)",
    )
    if "--dashboard-tokens" not in p._option_string_actions:
        p.add_argument(
            "--dashboard-tokens",
            type=int,
            default=32_768,
            help="corpus tokens the feature dashboards and cards read",
        )


def resolve_corpus(args: argparse.Namespace, tokenizer: Any = None) -> Any:
    """`args.corpus` as a `Corpus`; the default corpus is built once if missing (~1 min;
    `tokenizer` counts its tokens)."""
    from melbo_lens.analysis.corpus import DEFAULT_CORPUS, corpus_dir, load_corpus

    if args.dashboard_tokens < 128:
        raise CliError(f"--dashboard-tokens must be >= 128, got {args.dashboard_tokens}")
    name = args.corpus
    if name == DEFAULT_CORPUS and not (corpus_dir(name) / "manifest.json").is_file():
        from melbo_lens.analysis.corpus_build import build_corpus

        print(
            f"melbo_lens: first use of corpus {name!r}: building it offline once (about a "
            f"minute); later runs read the cache at {corpus_dir(name)}",
            flush=True,
        )
        return build_corpus(name, tokenizer=tokenizer)
    return load_corpus(name)
