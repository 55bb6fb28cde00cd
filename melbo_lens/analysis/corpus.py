"""A corpus is the text that features and perturbations are explained on.

It is a list of documents, each either prose (`text`) or a chat conversation
(`messages`, rendered with the model's own chat template when tokenised), each in the
`train` or `heldout` split. Explanations read a corpus as one token *stream*: documents
rendered, tokenised without special tokens, joined with the tokenizer's EOS, and cut
into rows of `ctx` tokens (`Corpus.token_rows`). Contexts shown around a token are read
from that stream, so they may reach into the row before.

On disk a corpus is JSON lines, one document a line (``{"text": ...}`` or
``{"messages": [...]}``, optional ``"split"`` and ``"source"``), optionally gzipped, or a
plain ``.txt`` file whose blank-line-separated paragraphs are prose documents. A folder
holding ``corpus.jsonl.gz`` and ``manifest.json`` (as `build_corpus` writes) also works;
its manifest records provenance and the sha256 that `load_corpus` checks.

Names (`load_corpus("melbo-chat-prose")`) refer to corpora `build_corpus` makes offline
and caches under the melbo_lens cache; `"prompts"` is the bundled prompt list (about
100 tokens: enough for a smoke test, not for an explanation).

Examples:
    >>> c = Corpus.from_texts(["one doc", "two doc"], name="tiny")
    >>> len(c), c.documents[0].kind
    (2, 'prose')
    >>> Corpus.from_records([{"messages": [{"role": "user", "content": "hi"}]}]).documents[0].kind
    'chat'
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from melbo_lens.core.io import atomic_write, atomic_write_text

__all__ = [
    "Corpus",
    "CorpusError",
    "Document",
    "DEFAULT_CORPUS",
    "corpus_dir",
    "load_corpus",
]

DEFAULT_CORPUS = "melbo-chat-prose"
SPLITS = ("train", "heldout")
CORPUS_FILE = "corpus.jsonl.gz"
MANIFEST_FILE = "manifest.json"


class CorpusError(ValueError):
    """A corpus file or name that cannot be read as a corpus."""


@dataclass(frozen=True)
class Document:
    """One prose text or one chat conversation, in one split."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    split: str = "train"
    source: str = ""

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "prose"

    def render(self, tokenizer: Any = None) -> str:
        """The document as one string: chat through `tokenizer`'s chat template when it
        has one, else ``role: content`` lines."""
        if self.messages is None:
            return self.text or ""
        msgs = [{"role": r, "content": c} for r, c in self.messages]
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template(msgs, tokenize=False))
        return "\n".join(f"{r}: {c}" for r, c in self.messages)

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = (
            {"text": self.text}
            if self.messages is None
            else {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        )
        rec["split"] = self.split
        if self.source:
            rec["source"] = self.source
        return rec


@dataclass
class Corpus:
    """Documents plus where they came from (`provenance`); see the module docstring.

    Attributes:
        documents: The texts and conversations, each with its split and source.
        name: The corpus's name (e.g. `"melbo-chat-prose"`).
        provenance: How it was built: sources, counts, seed, token count, digest.
    """

    documents: list[Document]
    name: str = "corpus"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.documents:
            raise CorpusError(
                f"corpus {self.name!r} has no documents; give at least one non-empty text"
            )

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:
        kinds = self.counts()
        return f"Corpus({self.name!r}, {len(self)} documents, {kinds})"

    def counts(self) -> dict[str, int]:
        """Documents by kind and split."""
        out: dict[str, int] = {}
        for d in self.documents:
            for key in (d.kind, d.split):
                out[key] = out.get(key, 0) + 1
        return out

    @property
    def sha256(self) -> str:
        """Digest of the documents (content, kind and split), independent of file format."""
        h = hashlib.sha256()
        for d in self.documents:
            h.update(json.dumps(d.to_record(), sort_keys=True).encode())
            h.update(b"\n")
        return h.hexdigest()

    def split(self, which: str) -> Corpus:
        """The documents of one split (`"train"` or `"heldout"`)."""
        if which not in SPLITS:
            raise CorpusError(f"split must be one of {SPLITS}, got {which!r}")
        docs = [d for d in self.documents if d.split == which]
        if not docs:
            raise CorpusError(
                f"corpus {self.name!r} has no {which!r} documents "
                f"(it has {self.counts()}); use the other split or mark some documents"
            )
        return Corpus(docs, f"{self.name}:{which}", {**self.provenance, "split": which})

    # ------------------------------------------------------------------ tokens
    def token_stream(
        self, tokenizer: Any, *, max_tokens: int | None = None
    ) -> Int[Tensor, " n_tokens"]:
        """All documents rendered, tokenised without special tokens, joined by EOS."""
        sep = getattr(tokenizer, "eos_token_id", None)
        ids: list[int] = []
        for d in self.documents:
            text = d.render(tokenizer)
            if not text:
                continue
            ids += list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if sep is not None:
                ids.append(int(sep))
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if not ids:
            raise CorpusError(f"corpus {self.name!r} tokenises to no tokens")
        return torch.tensor(ids, dtype=torch.long)

    def token_rows(
        self, tokenizer: Any, ctx: int = 128, *, max_tokens: int | None = None
    ) -> Int[Tensor, "rows ctx"]:
        """`token_stream` cut into rows of `ctx` tokens (a partial last row is dropped)."""
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
            raise ValueError(f"ctx must be an int >= 2, got {ctx!r}")
        stream = self.token_stream(tokenizer, max_tokens=max_tokens)
        n = len(stream) // ctx
        if n == 0:
            raise CorpusError(
                f"corpus {self.name!r} has {len(stream)} tokens, fewer than one row of "
                f"ctx={ctx}; give more text or a smaller ctx"
            )
        return stream[: n * ctx].view(n, ctx)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_texts(
        cls, texts: Iterable[str], *, name: str = "texts", split: str = "train"
    ) -> Corpus:
        """Prose documents from strings (empty ones are dropped)."""
        if isinstance(texts, str):
            texts = [texts]
        return cls([Document(text=t, split=split) for t in texts if t and t.strip()], name)

    @classmethod
    def from_records(
        cls, records: Iterable[dict[str, Any]], *, name: str = "records", where: str = ""
    ) -> Corpus:
        """Documents from dicts with ``text`` or ``messages`` (see the module docstring)."""
        docs = []
        for i, rec in enumerate(records):
            at = f"{where}record {i + 1}" if where else f"record {i + 1}"
            docs.append(_document(rec, at))
        return cls([d for d in docs if d.text or d.messages], name)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON lines (gzipped for ``.gz``), atomically."""
        path = Path(path)
        lines = "".join(
            json.dumps(d.to_record(), ensure_ascii=False) + "\n" for d in self.documents
        )
        data = lines.encode("utf-8")
        if path.suffix == ".gz":
            data = gzip.compress(data, compresslevel=6, mtime=0)
        return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _document(rec: Any, at: str) -> Document:
    if not isinstance(rec, dict):
        raise CorpusError(f"{at}: expected an object with 'text' or 'messages', got {rec!r:.60}")
    split = rec.get("split", "train")
    if split not in SPLITS:
        raise CorpusError(f"{at}: split must be one of {SPLITS}, got {split!r}")
    source = str(rec.get("source", ""))
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise CorpusError(f"{at}: 'messages' must be a list of {{'role': str, 'content': str}}")
        return Document(
            messages=tuple((m["role"], m["content"]) for m in msgs) or None,
            split=split,
            source=source,
        )
    if not isinstance(rec.get("text"), str):
        raise CorpusError(f"{at}: expected a string 'text' or a list 'messages'")
    return Document(text=rec["text"], split=split, source=source)


def corpus_dir(name: str = DEFAULT_CORPUS) -> Path:
    """Where the named built corpus is cached (``<melbo_lens cache>/corpora/<name>``)."""
    from melbo_lens.models.cache import default_cache_dir

    return default_cache_dir() / "corpora" / name


def _read_bytes(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file at {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise CorpusError(f"{path} is not a readable gzip file ({err})") from err
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 4]!r}); "
            "re-encode it, e.g. `iconv -f latin1 -t utf-8`"
        ) from err


def _read_file(path: Path) -> Corpus:
    text = _read_bytes(path)
    if not text.strip():
        raise CorpusError(f"{path} is empty; a corpus needs at least one document")
    stem = path.name.split(".")[0]
    if ".jsonl" in path.name or ".json" in path.name:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"{path}, line {n}: not JSON ({err.msg}); a .jsonl corpus holds one "
                    '{"text": ...} or {"messages": [...]} object per line'
                ) from err
        corpus = Corpus.from_records(records, name=stem, where=f"{path}, ")
    else:
        paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
        corpus = Corpus.from_texts(paras, name=stem)
    corpus.provenance = {"path": str(path), "sha256": corpus.sha256}
    return corpus


def load_corpus(name_or_path: str | os.PathLike[str] | Corpus | Sequence[str]) -> Corpus:
    """A corpus from a file, a folder `build_corpus` wrote, a name, or a list of texts.

    Names: ``"melbo-chat-prose"`` (the default; built offline and cached by
    `build_corpus` / `melbo-lens corpus build`), ``"prompts"`` (the bundled prompt list).
    A folder's manifest digest is checked, so a damaged cache is an error, not a quiet
    change of what is shown.

    Args:
        name_or_path: A corpus name, a folder `build_corpus` wrote, a `.jsonl(.gz)` file, a
            `Corpus`, or a list of texts.

    Returns:
        The corpus.

    Raises:
        CorpusError: A record is malformed, or the folder's manifest digest does not match
            its documents (a `ValueError`).
        FileNotFoundError: A named corpus has not been built (run `melbo-lens corpus
            build`).

    Examples:
        >>> load_corpus(["a text", "another"]).counts()
        {'prose': 2, 'train': 2}
        >>> load_corpus("prompts").name
        'prompts'
    """
    if isinstance(name_or_path, Corpus):
        return name_or_path
    if isinstance(name_or_path, list | tuple):
        return Corpus.from_texts(list(name_or_path), name="texts")
    key = os.fspath(name_or_path)  # type: ignore[arg-type]
    if key == "prompts":
        from importlib import resources

        data = json.loads(resources.files("melbo_lens").joinpath("data/prompts.json").read_text())
        texts = [t for v in data.values() if isinstance(v, list) for t in v if isinstance(t, str)]
        return Corpus.from_texts(list(dict.fromkeys(texts)), name="prompts")
    path = Path(key).expanduser()
    if not path.exists() and "/" not in key and not path.suffix:
        path = corpus_dir(key)
        if not (path / MANIFEST_FILE).is_file():
            raise FileNotFoundError(
                f"corpus {key!r} is not built on this machine (looked in {path}); build it "
                f"with `melbo-lens corpus build --name {key}` (offline, a minute or two) or "
                "pass a corpus file (.jsonl, .jsonl.gz or .txt)"
            )
    if path.is_dir():
        return _read_built(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no corpus at {path}; pass a .jsonl/.jsonl.gz/.txt file, a folder written by "
            f"`melbo-lens corpus build`, or a name such as {DEFAULT_CORPUS!r}"
        )
    return _read_file(path)


def _read_built(path: Path) -> Corpus:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CorpusError(f"{path} is a folder without {MANIFEST_FILE}; pass the corpus file")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorpusError(f"{manifest_path} is not valid JSON ({err})") from err
    corpus = _read_file(path / CORPUS_FILE)
    if corpus.sha256 != manifest.get("sha256"):
        raise CorpusError(
            f"{path / CORPUS_FILE} does not match its manifest (sha256 differs): the cache "
            f"is damaged or was edited. Rebuild it: `melbo-lens corpus build --name "
            f"{manifest.get('name', path.name)} --overwrite`"
        )
    corpus.name = str(manifest.get("name", path.name))
    corpus.provenance = manifest
    return corpus


def write_built(corpus: Corpus, out: Path, manifest: dict[str, Any]) -> Path:
    """Write a built corpus folder: the documents, then the manifest (last, atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    corpus.save(out / CORPUS_FILE)
    manifest = {**manifest, "name": corpus.name, "sha256": corpus.sha256, **corpus.counts()}
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    corpus.provenance = manifest
    return out
