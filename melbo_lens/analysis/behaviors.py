"""Behaviours: named groups of completions, by rule or by similarity.

A *behaviour* is what a steering vector makes the model do ("refuses", "talks about
cheese", "writes Python"). Completions are labelled in two passes:

1. **Rules** the user supplies, tried in order; the first that matches names the
   behaviour. A rule's pattern is a substring (case-insensitive unless told otherwise),
   a compiled regular expression (`re.search`) or any callable `text -> bool`.
2. **Clusters** for what no rule matched: agglomerative clustering with average
   linkage on the cosine distance between sentence embeddings (all-MiniLM-L6-v2 by
   default), merging while the closest two groups are nearer than `threshold`.
   Clusters are named `cluster-0`, `cluster-1`, ... by size (largest first, ties by
   first appearance), so distinct behaviours surface without any rules. Deterministic.

Each cluster's *exemplar* is its member closest to the cluster's mean embedding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.analysis.diversity import Embedder, embed_texts

__all__ = [
    "BehaviorReport",
    "BehaviorRule",
    "agglomerative_clusters",
    "classify_completions",
]

UNLABELLED = "unmatched"


@dataclass(frozen=True)
class BehaviorRule:
    """A named behaviour and how to recognise it in a completion.

    `pattern`: a `str` (substring; case-insensitive unless `case_sensitive=True`), a
    compiled `re.Pattern` (matches if `pattern.search(text)`), or a callable
    `text -> bool`.

    Args:
        name: The behaviour's label.
        pattern: A substring, a compiled regular expression, or a `text -> bool` callable.
        case_sensitive: Match a substring pattern case-sensitively.

    Examples:
        >>> BehaviorRule("cheese", "cheese").matches("I love CHEESE!")
        True
        >>> import re
        >>> BehaviorRule("number", re.compile(r"\\d+")).matches("no digits")
        False
        >>> BehaviorRule("short", lambda t: len(t) < 5).matches("hi")
        True
    """

    name: str
    pattern: str | re.Pattern[str] | Callable[[str], bool]
    case_sensitive: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a rule needs a non-empty name, got {self.name!r}")
        if self.name.startswith("cluster-") or self.name == UNLABELLED:
            raise ValueError(
                f"rule name {self.name!r} is reserved for automatic labels; choose another"
            )
        ok = isinstance(self.pattern, str | re.Pattern) or callable(self.pattern)
        if not ok:
            raise TypeError(
                f"rule {self.name!r}: pattern must be a str, re.Pattern or callable, "
                f"got {type(self.pattern).__name__}"
            )

    def matches(self, text: str) -> bool:
        p = self.pattern
        if isinstance(p, str):
            return p in text if self.case_sensitive else p.lower() in text.lower()
        if isinstance(p, re.Pattern):
            return p.search(text) is not None
        return bool(p(text))

    def describe(self) -> str:
        p = self.pattern
        if isinstance(p, str):
            return f"contains {p!r}" + (" (case-sensitive)" if self.case_sensitive else "")
        if isinstance(p, re.Pattern):
            return f"regex {p.pattern!r}"
        return f"callable {getattr(p, '__name__', type(p).__name__)}"


def _as_rule(rule: BehaviorRule | tuple[str, Any]) -> BehaviorRule:
    return rule if isinstance(rule, BehaviorRule) else BehaviorRule(*rule)


@dataclass
class BehaviorReport:
    """Labels of completions: `labels[i]` is a rule name, `cluster-k` or `unmatched`.

    `sources[i]` says where completion i came from (e.g. "vector 3, prompt 0") when
    known; `matched[i]` lists every rule that matched (the label is the first);
    `exemplars` maps each cluster to its most central member.

    Attributes:
        texts: The completions classified.
        labels: Per completion: a rule's name, `cluster-k` or `unmatched`.
        matched: Per completion, every rule that matched.
        rules: The rules' names, in the order tried.
        exemplars: Per cluster, its most central completion.
        sources: Per completion, where it came from (when known).
        settings: The classifier's settings (embedding model, threshold).
    """

    texts: list[str]
    labels: list[str]
    matched: list[list[str]]
    rules: list[str]
    exemplars: dict[str, str] = field(default_factory=dict)
    sources: list[str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Completions per behaviour: rules in their order, then clusters, then unmatched."""
        order = [*self.rules, *sorted(self.exemplars, key=_cluster_key), UNLABELLED]
        return {k: self.labels.count(k) for k in order if k in self.labels}

    def members(self, label: str) -> list[int]:
        return [i for i, lab in enumerate(self.labels) if lab == label]

    def by_source(self) -> dict[str, str]:
        return dict(zip(self.sources or [], self.labels, strict=False))

    def to_dict(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "labels": self.labels,
            "matched": self.matched,
            "rules": self.rules,
            "counts": self.counts,
            "exemplars": self.exemplars,
            "sources": self.sources,
            "settings": self.settings,
        }

    def table(self, width: int = 70) -> str:
        """One line per behaviour: count, share, and an example completion."""
        n = len(self.texts)
        lines = [f"{'behaviour':<14} {'count':>5} {'share':>6}  example"]
        for label, count in self.counts.items():
            example = self.exemplars.get(label) or self.texts[self.members(label)[0]]
            lines.append(f"{label:<14} {count:>5} {count / n:>6.1%}  {_short(example, width)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _cluster_key(label: str) -> int:
    return int(label.split("-", 1)[1])


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def agglomerative_clusters(
    embeddings: Float[Tensor, "n dim"], *, threshold: float = 0.7
) -> list[int]:
    """Average-linkage clustering on cosine distance; cluster id per row, 0 = largest.

    Starting from singletons, repeatedly merge the two clusters with the smallest mean
    pairwise cosine distance d(A, B) = mean_{a∈A, b∈B} (1 − cos(e_a, e_b)), while that
    distance is below `threshold` (ties: the lowest-indexed pair). Ids are ordered by
    cluster size, largest first, ties by first member.

    Examples:
        >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> agglomerative_clusters(e, threshold=0.5)
        [0, 0, 1]
    """
    e = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=-1)
    n = e.shape[0]
    if n == 0:
        return []
    dist = (1.0 - e @ e.T).clamp_min(0.0)
    sizes = torch.ones(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    members = [[i] for i in range(n)]
    # link[a, b] = Σ distances between members of a and b; average = link / (|a| |b|)
    link = dist.clone()
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    while int(alive.sum()) > 1:
        avg = link / (sizes[:, None] * sizes[None, :])
        pair = alive[:, None] & alive[None, :] & ~torch.eye(n, dtype=torch.bool)
        avg = torch.where(pair, avg, inf)
        flat = int(torch.argmin(avg))
        a, b = divmod(flat, n)
        if not float(avg[a, b]) < threshold:
            break
        a, b = min(a, b), max(a, b)
        link[a] += link[b]
        link[:, a] += link[:, b]
        sizes[a] += sizes[b]
        alive[b] = False
        members[a] += members[b]
        members[b] = []
    groups = [sorted(m) for m in members if m]
    groups.sort(key=lambda m: (-len(m), m[0]))
    ids = [0] * n
    for k, m in enumerate(groups):
        for i in m:
            ids[i] = k
    return ids


def _flatten(completions: Any) -> tuple[list[str], list[str] | None]:
    steered = getattr(completions, "steered", None)
    if steered is not None and hasattr(completions, "indices"):
        texts, sources = [], []
        for v, k in enumerate(completions.indices):
            for i, text in enumerate(steered[v]):
                texts.append(text)
                sources.append(f"vector {k}, prompt {i}")
        return texts, sources
    if isinstance(completions, str):
        completions = [completions]
    return [str(t) for t in completions], None


def classify_completions(
    completions: Sequence[str] | Any,
    rules: Sequence[BehaviorRule | tuple[str, Any]] = (),
    *,
    cluster: bool = True,
    embed: Embedder | None = None,
    threshold: float = 0.7,
) -> BehaviorReport:
    """Label each completion with the first matching rule, and cluster the rest.

    `completions`: texts, or a `SteeredGenerations` (its steered rows, vector-major,
    with "vector k, prompt i" as sources). `rules`: `BehaviorRule`s or `(name, pattern)`
    tuples, tried in order. With `cluster=False` unmatched completions are labelled
    `unmatched`; otherwise they are clustered by `agglomerative_clusters` on `embed(texts)`
    (default all-MiniLM-L6-v2) with cosine-distance `threshold`. 0.7 suits MiniLM:
    paraphrases sit at ~0.05-0.35 from each other, texts on one topic (sums with different
    numbers) at ~0.5-0.7, unrelated texts at ~0.8-1.0; lower it to split finer.

    Args:
        completions: texts, or a `SteeredGenerations`.
        rules: `BehaviorRule`s or `(name, pattern)` tuples (a substring, a compiled
            regex or a callable), tried in order; names must be unique.
        cluster: cluster the completions no rule matches (else label them unmatched).
        embed: texts -> embeddings for the clustering (default: all-MiniLM-L6-v2).
        threshold: the cosine distance below which clusters merge.

    Returns:
        `BehaviorReport`: a label per completion, every rule each matched, exemplars
        and `table()`.

    Raises:
        ValueError: rule names that repeat.

    Examples:
        >>> report = classify_completions(
        ...     ["I love cheese", "2 + 2 = 4", "Brie is great"],
        ...     [BehaviorRule("cheese", "cheese"), ("math", re.compile(r"\\d"))],
        ...     cluster=False,
        ... )
        >>> report.labels
        ['cheese', 'math', 'unmatched']
    """
    texts, sources = _flatten(completions)
    rule_list = [_as_rule(r) for r in rules]
    names = [r.name for r in rule_list]
    if len(set(names)) != len(names):
        raise ValueError(f"rule names must be unique, got {names}")
    matched = [[r.name for r in rule_list if r.matches(t)] for t in texts]
    labels = [m[0] if m else UNLABELLED for m in matched]
    rest = [i for i, lab in enumerate(labels) if lab == UNLABELLED]
    exemplars: dict[str, str] = {}
    if cluster and rest:
        emb = embed_texts([texts[i] for i in rest], embed)
        ids = agglomerative_clusters(emb, threshold=threshold)
        unit = torch.nn.functional.normalize(emb, dim=-1)
        for k in sorted(set(ids)):
            rows = [r for r, c in enumerate(ids) if c == k]
            centre = unit[rows].mean(0)
            best = rows[int(torch.argmax(unit[rows] @ centre))]
            exemplars[f"cluster-{k}"] = texts[rest[best]]
        for r, i in enumerate(rest):
            labels[i] = f"cluster-{ids[r]}"
    settings = {
        "cluster": cluster,
        "threshold": threshold,
        "embed": "all-MiniLM-L6-v2" if embed is None else getattr(embed, "__name__", "custom"),
        "rules": {r.name: r.describe() for r in rule_list},
    }
    return BehaviorReport(texts, labels, matched, names, exemplars, sources, settings)
