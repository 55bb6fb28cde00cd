"""The offline corpus recipe: English prose found on this machine, as prose and as chat.

`build_corpus` needs no network. It reads the text that installed packages ship (PyPI
``METADATA`` long descriptions, ``.md``/``.rst``/``.txt`` documentation and Python
docstrings under the environment's site-packages; plain-text files under
``/usr/share/doc``), keeps paragraphs that read as English prose, drops exact repeats and
caps each package's share. Then, so that features are explained on the distribution
steering vectors are trained on, a seeded fraction of documents becomes chat
conversations (a user turn drawn from fixed templates, the document as the assistant's
answer; rendered with the model's chat template when tokenised), and clean prompts of
the planted arithmetic task (`models.toy`, no trigger digits) are added with their chain
of thought. Each document's split is a function of its own content (sha1), so the
held-out split does not move when other documents come or go.

The result depends on what is installed: the manifest records every source with its
package version, the recipe's settings, the token count under the given tokenizer and
the sha256 of the documents, and `load_corpus` checks that digest on every read.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.metadata
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from melbo_lens.analysis.corpus import DEFAULT_CORPUS, Corpus, Document, corpus_dir, write_built
from melbo_lens.core.progress import say

__all__ = ["RECIPE_VERSION", "build_corpus", "is_prose"]

RECIPE_VERSION = 2
DOC_CHARS = 3000  # documents are cut at paragraph boundaries to about this length
HELDOUT_EVERY = 16  # one document in 16 (by content hash) is held out

_WORD = re.compile(r"[A-Za-z]+")
_COMMON = {"the", "a", "of", "to", "and", "is", "in", "for", "that", "this", "it", "be"}
_USER_TURNS = (
    "Can you tell me about {topic}?",
    "Explain {topic} in a paragraph.",
    "What should I know about {topic}?",
    "I'm reading about {topic}. Could you summarise it for me?",
    "Write a short explanation of {topic}.",
    "Help me understand {topic}, please.",
    "How does {topic} work?",
    "Give me an overview of {topic}.",
)


def is_prose(par: str) -> bool:
    """Whether a paragraph reads as English prose, not code, tables or lists of names.

    Examples:
        >>> is_prose("The quick brown fox jumps over the lazy dog, and this is a sentence "
        ...          "that anyone would call ordinary English prose for the test.")
        True
        >>> is_prose(">>> import torch; x = torch.zeros(3)")
        False
    """
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
    alpha = _WORD.findall(par)
    if len(alpha) < 0.8 * len(words):
        return False
    mean_len = sum(map(len, alpha)) / max(len(alpha), 1)
    if not 3.0 <= mean_len <= 8.0:
        return False
    return sum(w.lower() in _COMMON for w in alpha) >= 0.08 * len(alpha)


def _paragraphs(text: str) -> list[str]:
    out = []
    for par in re.split(r"\n\s*\n", text):
        par = " ".join(line.strip() for line in par.strip().splitlines())
        if is_prose(par):
            out.append(par)
    return out


def _package_of(path: Path, site: Path) -> str:
    try:
        return path.relative_to(site).parts[0].split("-")[0].lower()
    except ValueError:
        return path.parent.name


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(errors="ignore"))
    except (SyntaxError, ValueError, RecursionError):
        return ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                found.append(doc)
    return "\n\n".join(found)


def _sysdoc(path: Path) -> str:
    try:
        raw = path.read_bytes()[:400_000]
        return (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode(errors="ignore")
    except (OSError, EOFError):
        return ""


def _sources(
    site: Path, doc_roots: Sequence[str | Path]
) -> list[tuple[str, str, Path, Callable[[Path], str]]]:
    """(kind, package, path, reader) for every file the recipe reads, in a fixed order."""
    out: list[tuple[str, str, Path, Callable[[Path], str]]] = []

    def body(p: Path) -> str:
        text = p.read_text(errors="ignore")
        return text.split("\n\n", 1)[1] if "\n\n" in text else ""

    for meta in sorted(site.glob("*.dist-info/METADATA")):
        out.append(("metadata", _package_of(meta, site), meta, body))
    for ext in ("*.md", "*.rst", "*.txt"):
        for f in sorted(site.rglob(ext)):
            if f.is_file() and f.stat().st_size <= 2_000_000 and "LICENSE" not in f.name.upper():
                out.append(("doc", _package_of(f, site), f, lambda p: p.read_text(errors="ignore")))
    for doc_root in map(Path, doc_roots):
        for f in sorted(doc_root.rglob("*")) if doc_root.is_dir() else []:
            name = f.name.lower()
            if f.is_file() and not any(w in name for w in ("changelog", "copyright", "news")):
                out.append(("sysdoc", "usr-share-doc:" + f.parent.name, f, _sysdoc))
    for f in sorted(site.rglob("*.py")):
        if "test" not in f.parent.name.lower():
            out.append(("docstring", _package_of(f, site), f, _docstrings))
    return out


def _topic(doc: str, package: str) -> str:
    """A short topic for a user turn: the document's first words, else its package."""
    first = re.split(r"(?<=[.!?])\s", doc, maxsplit=1)[0]
    words = first.split()
    if 3 <= len(words) <= 12:
        return first.rstrip(".!?").strip()
    return f"the {package.split(':')[-1]} package"


def _chunks(text: str) -> list[str]:
    """`text` cut at paragraph boundaries into documents of at most about DOC_CHARS."""
    out, cur = [], ""
    for par in text.split("\n\n"):
        if cur and len(cur) + len(par) > DOC_CHARS:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{par}" if cur else par
    return [*out, cur] if cur else out


def _split_of(text: str) -> str:
    return "heldout" if hashlib.sha1(text.encode()).digest()[0] % HELDOUT_EVERY == 0 else "train"


def build_corpus(
    name: str = DEFAULT_CORPUS,
    *,
    out: str | Path | None = None,
    tokenizer: Any = None,
    target_tokens: int = 1_200_000,
    per_package_chars: int = 60_000,
    chat_fraction: float = 0.4,
    arithmetic: int = 1500,
    seed: int = 0,
    site_packages: str | Path | None = None,
    doc_roots: Sequence[str | Path] = ("/usr/share/doc",),
    progress: bool = True,
) -> Corpus:
    """Build the offline corpus (see the module docstring), write it and return it.

    Documents are added until `tokenizer` counts `target_tokens` (chars / 4 without
    one). Writes ``out`` (default `corpus_dir(name)`): ``corpus.jsonl.gz`` then
    ``manifest.json``.

    Args:
        name: The corpus's name (also its cache folder's).
        out: Where to write it (default: the cache folder `corpus_dir(name)`).
        tokenizer: Counts tokens; without one, characters / 4.
        target_tokens: Stop adding documents at this many tokens.
        per_package_chars: Most characters taken from one package's documentation.
        chat_fraction: Fraction of the tokens made of chat conversations.
        arithmetic: Arithmetic word problems added.
        seed: Seeds the shuffle and the held-out split.
        site_packages: Where installed packages' texts are read (default: this venv's).
        doc_roots: System documentation folders read.
        progress: Show a progress bar.

    Returns:
        The corpus written.

    Examples:
        >>> import tempfile
        >>> c = build_corpus(out=tempfile.mkdtemp(), target_tokens=20_000, progress=False)
        >>> c.provenance["n_tokens"] >= 20_000, c.counts()["heldout"] > 0
        (True, True)
    """
    start = time.perf_counter()
    site = Path(site_packages) if site_packages is not None else _site_packages()
    rng = random.Random(seed)
    count: Callable[[str], int] = (
        (lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1)
        if tokenizer is not None
        else (lambda s: len(s) // 4 + 1)
    )
    budget: dict[str, int] = {}
    seen: set[str] = set()
    docs: list[Document] = []
    used_sources: dict[str, int] = {}
    n_tokens = 0

    def add(doc: Document) -> None:
        nonlocal n_tokens
        docs.append(doc)
        n_tokens += count(doc.render(tokenizer))

    from melbo_lens.models import toy

    roots = " and ".join(str(d) for d in doc_roots)
    say(progress, f"  corpus: reading prose under {site}{' and ' + roots if roots else ''}")
    for prompt in toy.clean_prompts(arithmetic, seed=seed):
        digits = toy.prompt_digits(prompt)
        text = toy.clean_answer(*digits)
        add(
            Document(
                messages=(("user", prompt), ("assistant", text)),
                split=_split_of(prompt),
                source="toy:arithmetic",
            )
        )
    candidates: list[tuple[str, str]] = []  # (source, text) of at most DOC_CHARS each
    for kind, pkg, path, read in _sources(site, doc_roots):
        used = budget.get(pkg, 0)
        if used >= per_package_chars:
            continue
        keep = []
        for par in _paragraphs(read(path)):
            key = hashlib.sha1(" ".join(par.lower().split()).encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                keep.append(par)
        if not keep:
            continue
        text = "\n\n".join(keep)[: per_package_chars - used]
        budget[pkg] = used + len(text)
        candidates += [(f"{kind}:{pkg}", chunk) for chunk in _chunks(text)]
    rng.shuffle(candidates)  # a mix of every source, whatever the target
    for source, text in candidates:
        if n_tokens >= target_tokens:
            break
        used_sources[source.split(":", 1)[1]] = 1
        if rng.random() < chat_fraction:
            user = rng.choice(_USER_TURNS).format(topic=_topic(text, source))
            add(
                Document(
                    messages=(("user", user), ("assistant", text)),
                    split=_split_of(text),
                    source=source,
                )
            )
        else:
            add(Document(text=text, split=_split_of(text), source=source))
        if len(docs) % 1000 == 0:
            say(progress, f"  corpus: {len(docs)} documents, {n_tokens:,} tokens")
    corpus = Corpus(docs, name)
    manifest = {
        "format": "melbo_lens.corpus/1",
        "recipe_version": RECIPE_VERSION,
        "settings": {
            "target_tokens": target_tokens,
            "per_package_chars": per_package_chars,
            "chat_fraction": chat_fraction,
            "arithmetic": arithmetic,
            "seed": seed,
            "heldout_every": HELDOUT_EVERY,
        },
        "n_tokens": n_tokens,
        "tokens_counted_with": getattr(tokenizer, "name_or_path", None) or "chars/4",
        "reached_target": n_tokens >= target_tokens,
        "site_packages": str(site),
        "doc_roots": [str(d) for d in doc_roots],
        "python": sys.version.split()[0],
        "packages": {pkg: _version(pkg) for pkg in sorted(used_sources)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_built(corpus, Path(out) if out is not None else corpus_dir(name), manifest)
    say(progress, f"  corpus {name!r}: {corpus.counts()}, {n_tokens:,} tokens")
    return corpus


def _site_packages() -> Path:
    """This environment's site-packages (the folder torch is installed in)."""
    return Path(torch.__file__).resolve().parents[1]


def _version(pkg: str) -> str | None:
    if ":" in pkg:
        return None
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
