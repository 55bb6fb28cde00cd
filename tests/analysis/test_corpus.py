"""The offline corpus recipe on a fake site-packages folder: deterministic, chat and prose,
a stable held-out split, a manifest whose digest `load_corpus` checks; the CLI refuses to
rebuild over a built corpus unless told."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_tokenizer

from melbo_lens.analysis.corpus import CorpusError, load_corpus
from melbo_lens.analysis.corpus_build import build_corpus
from melbo_lens.cli import main

PROSE = (
    "The {w} is a small animal that lives in the forest and it eats seeds and berries "
    "that fall from the trees during the long and warm days of the summer season."
)


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site-packages"
    for i, w in enumerate(["fox", "owl", "hare", "wren", "mole", "newt", "vole", "lynx"]):
        pkg = root / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / "README.md").write_text("\n\n".join(PROSE.format(w=f"{w}{j}") for j in range(6)))
        (pkg / "code.py").write_text('"""Not prose: x = 1."""\nx = 1\n')
    return root


def test_build_is_deterministic_with_chat_prose_and_splits(site, tmp_path):
    tok = make_tiny_tokenizer()
    kw = dict(tokenizer=tok, site_packages=site, doc_roots=[], arithmetic=20, progress=False)
    a = build_corpus("t", out=tmp_path / "a", **kw)
    b = build_corpus("t", out=tmp_path / "b", **kw)
    assert a.sha256 == b.sha256 and len(a) == len(b)
    counts = a.counts()
    assert counts["chat"] >= 20 and counts["prose"] > 0 and counts["heldout"] > 0
    chat = next(d for d in a.documents if d.kind == "chat" and d.source != "toy:arithmetic")
    assert chat.render(tok).startswith("<|user|>\n") and "<|assistant|>" in chat.render(tok)
    back = load_corpus(tmp_path / "a")
    assert back.sha256 == a.sha256 and back.provenance["n_tokens"] > 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["settings"]["arithmetic"] == 20 and manifest["doc_roots"] == []
    # the split of a document depends on its text alone: a smaller build keeps it
    small = build_corpus("t", out=tmp_path / "c", **{**kw, "target_tokens": 2000})
    split_of = {d.text or d.messages: d.split for d in a.documents}
    assert all(split_of[d.text or d.messages] == d.split for d in small.documents)


def test_a_damaged_cache_is_an_error(site, tmp_path):
    build_corpus(
        "t", out=tmp_path / "a", site_packages=site, doc_roots=[], arithmetic=4, progress=False
    )
    manifest = tmp_path / "a" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "sha256": "0" * 64}))
    with pytest.raises(CorpusError, match="does not match its manifest"):
        load_corpus(tmp_path / "a")


def test_cli_build_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert main(["corpus", "build", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["corpus", "info", str(tmp_path / "nope.jsonl")]) == 2
    assert "no corpus" in capsys.readouterr().err
