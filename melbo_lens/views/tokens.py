"""Token views: text coloured by how much a steering vector changes each token.

The views are circuitsvis components (`colored_tokens`, `colored_tokens_multi`), made
to work offline and many to a page:

* circuitsvis's `str()` imports its JavaScript from a CDN, which is blank offline.
  These views always use the locally bundled script (`RenderedHTML.local_src`).
* `local_src` inlines the whole bundle (≈1.3 MB) in every view. `html_fragment(view,
  bundle=False)` gives the view without it, and `bundle_script()` the bundle once, as a
  classic `<script>` that defines the global `CircuitsVis`; a page holds the bundle
  once and any number of fragments. The fragments' render calls are module scripts,
  which run after the page is parsed, so the bundle may sit anywhere on the page.
* circuitsvis writes its container as `<div id=... />`, which HTML parses as an
  unclosed div that swallows whatever follows; it is rewritten as `<div ...></div>`.
  Each view gets its own id, and `</` inside the data is escaped so a token such as
  `</script>` cannot end the script early.
* circuitsvis inserts token text as HTML (React `dangerouslySetInnerHTML`), so a model
  that writes `<img onerror=...>` would run script in the page; tokens are HTML-escaped
  before they reach it.

`TokenView` wraps a rendered view with a caption; it shows itself in Jupyter.
"""

from __future__ import annotations

import html
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import circuitsvis
import torch
from circuitsvis.tokens import colored_tokens, colored_tokens_multi
from circuitsvis.utils.render import RenderedHTML

from melbo_lens.analysis.tokens import TokenActivations, TokenDeltas

__all__ = [
    "TokenView",
    "bundle_script",
    "feature_activation_view",
    "html_fragment",
    "strip_bundle",
    "token_delta_view",
]

_DIV = re.compile(r'<div id="(?P<id>[^"]+)"(?P<attrs>[^>]*?)\s*(?:/>|></div>)')
_MODULE_OPEN = '<script crossorigin type="module">'
_RENDER = "CircuitsVis.render("
COMPLETION_MARK = "┃"  # prefixed to the first completion token
UNSTEERED_MARK = "◦"  # prefixed to tokens where the vector was not added


@dataclass
class TokenView:
    """A circuitsvis view rendered from the local bundle, with a caption above it."""

    rendered: RenderedHTML
    caption: str = ""

    @property
    def local_src(self) -> str:
        return self.rendered.local_src

    def _repr_html_(self) -> str:
        return html_fragment(self)


# ---------------------------------------------------------------------- html plumbing
@lru_cache(maxsize=1)
def _bundle_js() -> str:
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"circuitsvis's bundled JavaScript is missing ({path}); reinstall circuitsvis"
        )
    js = path.read_text(encoding="utf-8")
    js = re.sub(r"//# sourceMappingURL=\S*\s*$", "", js)  # no request for the .map file
    return js.replace("</script", "<\\/script")


def bundle_script() -> str:
    """The circuitsvis JavaScript as one classic `<script>`, to put once on a page.

    It defines the global `CircuitsVis` that fragments made with
    `html_fragment(view, bundle=False)` render with.
    """
    return f'<script type="text/javascript">\n{_bundle_js()}\n</script>'


def _split(src: str) -> tuple[str, str, str, str]:
    """(text before the div, div id, div attributes, render call) of a view's html."""
    div = _DIV.search(src)
    start = src.rfind(_RENDER)
    end = src.rfind("</script>")
    if div is None or start < 0 or end < start:
        raise ValueError(
            "not a circuitsvis local render (expected '<div id=... />' and a "
            "'CircuitsVis.render(' call); pass view.local_src of a circuitsvis view"
        )
    return src[: div.start()], div.group("id"), div.group("attrs"), src[start:end].strip()


def strip_bundle(html_text: str) -> str:
    """The same view without its inlined bundle: the container and the render call.

    Takes circuitsvis `local_src` or a full `html_fragment`; the result needs
    `bundle_script()` once on the page.
    """
    before, div_id, attrs, call = _split(html_text)
    return f'{before}<div id="{div_id}"{attrs}></div>\n<script type="module">\n{call}\n</script>'


def html_fragment(
    view: TokenView | RenderedHTML | str,
    *,
    bundle: bool = True,
    div_id: str | None = None,
) -> str:
    """Offline HTML of a view: local JavaScript, a closed `<div></div>`, a fresh div id.

    `bundle=True` gives a self-contained fragment (the bundle inlined, ≈1.3 MB);
    `bundle=False` a small one that needs `bundle_script()` once on the page.

    Examples:
        >>> page = bundle_script() + "".join(
        ...     html_fragment(token_delta_view(d), bundle=False) for d in deltas)  # doctest: +SKIP
    """
    caption = ""
    if isinstance(view, TokenView):
        caption = (
            f'<p class="melbo-caption">{html.escape(view.caption)}</p>\n' if view.caption else ""
        )
        src = view.rendered.local_src
    elif isinstance(view, RenderedHTML):
        src = view.local_src
    elif isinstance(view, str):
        src = view
    else:
        raise TypeError(
            f"expected a TokenView, a circuitsvis RenderedHTML or its html, got {view!r}"
        )
    _, old_id, attrs, call = _split(src)
    new_id = div_id or f"melbo-view-{uuid.uuid4().hex[:12]}"
    if not re.fullmatch(r"[A-Za-z][\w-]*", new_id):
        raise ValueError(
            f"div_id must be a plain HTML id (letters, digits, - and _), got {new_id!r}"
        )
    call = call.replace(f'"{old_id}"', f'"{new_id}"', 1).replace("</", "<\\/")
    div = f'<div id="{new_id}"{attrs}></div>'
    if bundle:
        body = f"{_MODULE_OPEN}\n{_bundle_js()}\n{call}\n</script>"
    else:
        body = f'<script type="module">\n{call}\n</script>'
    return f"{caption}{div}\n{body}"


# ---------------------------------------------------------------------- views
def _shown(token: str) -> str:
    """Token text for circuitsvis, which inserts it as HTML: escaped, newlines visible."""
    return html.escape(token, quote=False).replace("\n", "⏎\n")


def token_delta_view(deltas: TokenDeltas, *, max_value: float | None = None) -> TokenView:
    """The text coloured by ‖Δ_t‖ (white 0 to full colour at `max_value`, default the max).

    `┃` marks the first completion token; `◦` marks tokens where the vector was not
    added (none, when it was added everywhere). Hover shows each token's value.

    Examples:
        >>> token_delta_view(token_delta_norms(model, vectors, gens)[0])  # doctest: +SKIP
    """
    tokens = []
    for t, tok in enumerate(deltas.tokens):
        mark = COMPLETION_MARK if t == deltas.n_prompt and 0 < t else ""
        mark += "" if deltas.steered[t] else UNSTEERED_MARK
        tokens.append(mark + _shown(tok))
    top = max_value if max_value is not None else max(deltas.norms, default=0.0) or 1.0
    rendered = colored_tokens(tokens, list(deltas.norms), min_value=0.0, max_value=float(top))
    where = "every position" if all(deltas.steered) else "positions without ◦"
    caption = (
        f"{deltas.label}: ‖Δ_t‖ at {deltas.site} (max {max(deltas.norms, default=0.0):.3g}); "
        f"vector added at {where}"
        + (
            f"; {COMPLETION_MARK} starts the completion"
            if 0 < deltas.n_prompt < len(deltas.tokens)
            else ""
        )
    )
    return TokenView(rendered, caption)


def feature_activation_view(acts: TokenActivations) -> TokenView:
    """Feature activations per token with the vector, without it, and their change; the
    buttons switch which one colours the text, hover lists all three.

    Examples:
        >>> feature_activation_view(feature_token_activations(model, vectors, 0, sae, 12,
        ...                                                   text))   # doctest: +SKIP
    """
    tokens = [
        (COMPLETION_MARK if t == acts.n_prompt and 0 < t else "") + _shown(tok)
        for t, tok in enumerate(acts.tokens)
    ]
    values = torch.tensor([acts.steered, acts.unsteered, acts.change], dtype=torch.float32).T
    rendered = colored_tokens_multi(
        tokens, values, labels=["with vector", "without vector", "change"]
    )
    caption = (
        f"SAE feature {acts.feature} at {acts.site or 'its site'}, with and without "
        f"{acts.label} (max {max(acts.steered, default=0.0):.3g} vs "
        f"{max(acts.unsteered, default=0.0):.3g})"
    )
    return TokenView(rendered, caption)
