"""circuitsvis token views: offline, closed divs, unique ids, one bundle per page, safe text."""

from __future__ import annotations

import json
import re

import pytest
from circuitsvis.tokens import colored_tokens

from melbo_lens.analysis.tokens import TokenActivations, TokenDeltas
from melbo_lens.views.tokens import (
    COMPLETION_MARK,
    TokenView,
    bundle_script,
    feature_activation_view,
    html_fragment,
    strip_bundle,
    token_delta_view,
)

DELTAS = TokenDeltas(
    "melbo[0]",
    ["Hello", " there", " sea", "\n"],
    [0.0, 1.0, 2.5, 4.0],
    2,
    [True] * 4,
    "blocks.2.hook_resid_post",
)
ACTS = TokenActivations(
    "melbo[1]",
    7,
    ["the", " sea", " is"],
    [0.0, 3.0, 1.0],
    [0.0, 0.5, 1.0],
    2,
    "blocks.1.hook_resid_post",
    1,
)
BUNDLE_MARK = "var CircuitsVis="  # first statement of the circuitsvis bundle


def _props(fragment: str) -> dict:
    """The JSON props of the render call in a fragment."""
    call = fragment[fragment.rindex("CircuitsVis.render(") :]
    start = call.index("{")
    depth = 0
    for i, ch in enumerate(call[start:], start):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return json.loads(call[start : i + 1].replace("<\\/", "</"))
    raise AssertionError("no props found")


def _no_remote_script(html: str) -> None:
    assert not re.search(r"""src\s*=\s*["']?https?://""", html)
    assert not re.search(r"""import[^;]*from\s*["']https?://""", html)
    assert "unpkg.com" not in html


def test_fragment_is_offline_closed_and_has_the_tokens():
    view = token_delta_view(DELTAS)
    assert isinstance(view, TokenView)
    assert "/>" in view.local_src.split("\n")[0]  # circuitsvis's own output: self-closing
    full = html_fragment(view)
    _no_remote_script(full)
    assert BUNDLE_MARK in full
    assert re.search(r'<div id="melbo-view-[0-9a-f]{12}" style="[^"]*"></div>', full)
    assert not re.search(r"<div[^>]*/>", full.split("<script")[0])
    props = _props(full)
    assert props["tokens"] == ["Hello", " there", COMPLETION_MARK + " sea", "⏎\n"]
    assert props["values"] == DELTAS.norms and props["maxValue"] == 4.0
    assert "melbo[0]" in full and "blocks.2.hook_resid_post" in full  # caption


def test_two_views_have_distinct_ids_and_render_calls_use_them():
    a, b = html_fragment(token_delta_view(DELTAS)), html_fragment(token_delta_view(DELTAS))
    ids = [re.search(r'<div id="([^"]+)"', x).group(1) for x in (a, b)]
    assert ids[0] != ids[1]
    for x, div_id in zip((a, b), ids, strict=True):
        assert f'CircuitsVis.render(\n      "{div_id}"' in x
    fixed = html_fragment(token_delta_view(DELTAS), div_id="vec-0")
    assert '<div id="vec-0"' in fixed and '"vec-0"' in fixed.split("CircuitsVis.render(")[-1]
    with pytest.raises(ValueError, match="plain HTML id"):
        html_fragment(token_delta_view(DELTAS), div_id='x" onload="y')


def test_page_holds_the_bundle_once():
    views = [token_delta_view(DELTAS), feature_activation_view(ACTS), token_delta_view(DELTAS)]
    page = bundle_script() + "".join(html_fragment(v, bundle=False) for v in views)
    assert page.count(BUNDLE_MARK) == 1
    assert page.count("CircuitsVis.render(") == 3
    assert len(set(re.findall(r'<div id="([^"]+)"', page))) == 3
    _no_remote_script(page)
    # the bundle is a classic script (a global CircuitsVis); the calls are modules
    assert bundle_script().startswith('<script type="text/javascript">')
    assert "sourceMappingURL" not in bundle_script()
    assert bundle_script().count("</script") == 1  # only its own closing tag
    small = html_fragment(views[0], bundle=False)
    assert len(small) < 5_000 < len(html_fragment(views[0]))


def test_strip_bundle_of_local_src_and_of_a_fragment():
    raw = colored_tokens(["a", "b"], [1.0, 2.0]).local_src
    stripped = strip_bundle(raw)
    assert BUNDLE_MARK not in stripped and BUNDLE_MARK in raw
    assert re.match(
        r'<div id="circuits-vis-[^"]+" style="[^"]*"></div>\n<script type="module">', stripped
    )
    assert _props(stripped)["tokens"] == ["a", "b"]
    full = html_fragment(token_delta_view(DELTAS))
    small = strip_bundle(full)
    assert BUNDLE_MARK not in small and "melbo[0]" in small  # the caption stays
    assert _props(small) == _props(full)
    with pytest.raises(ValueError, match="not a circuitsvis"):
        strip_bundle("<p>hello</p>")


def test_token_text_is_escaped_and_cannot_end_the_script():
    nasty = TokenDeltas(
        "v",
        ["ok", "</script><img src=x onerror=alert(1)>", " & <b>"],
        [1.0, 2.0, 3.0],
        3,
        [True, False, True],
        "s",
    )
    frag = html_fragment(token_delta_view(nasty), bundle=False)
    script = frag.split('<script type="module">')[1]
    assert script.count("</script") == 1  # only the closing tag
    assert "<img" not in frag
    tokens = _props(frag)["tokens"]
    # circuitsvis inserts tokens as HTML: they arrive escaped; ◦ marks the unsteered one
    assert tokens == [
        "ok",
        "◦&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;",
        " &amp; &lt;b&gt;",
    ]
    assert "positions without ◦" in frag


def test_feature_activation_view_shows_both_runs_and_change():
    frag = html_fragment(feature_activation_view(ACTS), bundle=False)
    props = _props(frag)
    assert props["labels"] == ["with vector", "without vector", "change"]
    assert props["tokens"] == ["the", " sea", COMPLETION_MARK + " is"]
    assert props["values"] == [[0.0, 0.0, 0.0], [3.0, 0.5, 2.5], [1.0, 1.0, 0.0]]
    assert "ColoredTokensMulti" in frag
    assert "feature 7" in frag and "melbo[1]" in frag
    assert TokenView(feature_activation_view(ACTS).rendered)._repr_html_().count(BUNDLE_MARK) == 1
