"""generate_steered / generate_tokens against hand-written greedy decoding."""

from __future__ import annotations

import pytest
import torch

from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite
from melbo_lens.generation import generate, generate_steered, generate_tokens
from melbo_lens.perturbations.vectors import SteeringVectors, steer

SITE = HookSite(1)
TEXTS = ["the cat sat on", "hi", "one two"]
N_NEW = 6


@pytest.fixture(scope="module")
def vectors() -> SteeringVectors:
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(3, 32, generator=gen)
    return SteeringVectors(20.0 * v / v.norm(dim=-1, keepdim=True), SITE, method="random")


def _greedy_by_hand(model, row, n_new, eos, vector=None):
    """Full forward on the growing prompt alone, argmax, no cache, no padding."""
    tokens = torch.tensor([row])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n_new):
            if vector is None:
                logits = model(tokens)
            else:
                with steer(model, SITE, vector):
                    logits = model(tokens)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return out


def _text(tok, ids):
    eos = tok.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tok.decode(ids, skip_special_tokens=True)


def _call_tokens(model, ps, row_vectors, prompt_rows, **kw):
    tokens, mask = ps.left_padded(model.tokenizer.pad_token_id)
    settings = dict(
        max_new_tokens=N_NEW,
        do_sample=False,
        temperature=1.0,
        top_p=None,
        seed=0,
        eos_token_id=None,
    )
    settings.update(kw)
    return generate_tokens(
        model, SITE, row_vectors, tokens[prompt_rows], mask[prompt_rows], **settings
    )


def test_unsteered_row_is_greedy_decoding(tiny_tok_model, vectors):
    tok = tiny_tok_model.tokenizer
    gens = generate_steered(tiny_tok_model, vectors, TEXTS, max_new_tokens=N_NEW)
    ps = PromptSet.from_texts(tiny_tok_model, TEXTS)
    expected = [
        _text(tok, _greedy_by_hand(tiny_tok_model, row, N_NEW, tok.eos_token_id))
        for row in ps.token_lists()
    ]
    assert gens.unsteered == expected
    assert gens.prompts == TEXTS
    assert gens.indices == [0, 1, 2]
    assert len(gens.steered) == 3 and all(len(s) == len(TEXTS) for s in gens.steered)
    assert gens.settings["site"] == SITE.name and gens.settings["max_new_tokens"] == N_NEW


def test_steered_rows_are_greedy_decoding_under_steer(tiny_tok_model, vectors):
    tok = tiny_tok_model.tokenizer
    gens = generate_steered(tiny_tok_model, vectors, TEXTS, scale=0.5, max_new_tokens=N_NEW)
    rows = PromptSet.from_texts(tiny_tok_model, TEXTS).token_lists()
    for v in range(len(vectors)):
        expected = [
            _text(
                tok,
                _greedy_by_hand(
                    tiny_tok_model, row, N_NEW, tok.eos_token_id, vectors.vectors[v] * 0.5
                ),
            )
            for row in rows
        ]
        assert gens.steered[v] == expected, v
        assert gens.for_vector(v) == expected
    # The vectors are strong enough to change something: the test is not vacuous.
    assert any(gens.steered[v] != gens.unsteered for v in range(len(vectors)))


def test_token_level_greedy_matches_hand_loop(tiny_tok_model, vectors):
    ps = PromptSet.from_texts(tiny_tok_model, TEXTS)
    n = len(ps)
    vecs = torch.cat([torch.zeros(1, 32), vectors.vectors])  # row = (vector, prompt)
    row_vectors = vecs.repeat_interleave(n, dim=0)
    prompt_rows = torch.arange(n).repeat(vecs.shape[0])
    out = _call_tokens(tiny_tok_model, ps, row_vectors, prompt_rows)
    assert out.shape == (len(row_vectors), N_NEW)
    for r in range(len(row_vectors)):
        row = ps.token_lists()[int(prompt_rows[r])]
        vec = None if r < n else row_vectors[r]
        assert out[r].tolist() == _greedy_by_hand(tiny_tok_model, row, N_NEW, None, vec), r


def test_batching_vectors_equals_one_at_a_time(tiny_tok_model, vectors):
    together = generate_steered(tiny_tok_model, vectors, TEXTS, max_new_tokens=N_NEW)
    for k in range(len(vectors)):
        alone = generate_steered(tiny_tok_model, vectors, TEXTS, indices=[k], max_new_tokens=N_NEW)
        assert alone.steered == [together.steered[k]]
        assert alone.unsteered == together.unsteered
    # Decoding in chunks of rows gives the same greedy completions.
    chunked = generate_steered(tiny_tok_model, vectors, TEXTS, max_new_tokens=N_NEW, max_rows=2)
    assert chunked.steered == together.steered and chunked.unsteered == together.unsteered
    # One prompt at a time too (no left padding at all).
    for i, text in enumerate(TEXTS):
        solo = generate_steered(tiny_tok_model, vectors, text, max_new_tokens=N_NEW)
        assert solo.unsteered == [together.unsteered[i]]
        assert solo.steered == [[s[i]] for s in together.steered]


def test_zero_vector_equals_unsteered(tiny_tok_model, vectors):
    sv = SteeringVectors(torch.cat([torch.zeros(1, 32), vectors.vectors[:1]]), SITE)
    gens = generate_steered(tiny_tok_model, sv, TEXTS, max_new_tokens=N_NEW, scale=3.0)
    assert gens.steered[0] == gens.unsteered
    assert gens.steered[1] != gens.unsteered  # a real vector changes something


def test_zero_scale_equals_unsteered(tiny_tok_model, vectors):
    gens = generate_steered(tiny_tok_model, vectors, TEXTS, max_new_tokens=N_NEW, scale=0.0)
    assert all(s == gens.unsteered for s in gens.steered)


def test_include_unsteered_false_and_indices(tiny_tok_model, vectors):
    ref = generate_steered(tiny_tok_model, vectors, TEXTS, max_new_tokens=N_NEW)
    gens = generate_steered(
        tiny_tok_model,
        vectors,
        TEXTS,
        indices=[2, -3],
        include_unsteered=False,
        max_new_tokens=N_NEW,
    )
    assert gens.unsteered is None
    assert gens.indices == [2, 0]
    assert gens.steered == [ref.steered[2], ref.steered[0]]
    assert gens.for_vector(0) == ref.steered[0]
    table = gens.table()
    assert "vector   2" in table and "unsteered" not in table
    assert gens.to_dict()["steered"] == gens.steered


@pytest.mark.parametrize("seed", [0, 3])
def test_kv_cache_and_no_cache_give_identical_tokens(tiny_tok_model, vectors, seed):
    ps = PromptSet.from_texts(tiny_tok_model, TEXTS)
    n = len(ps)
    vecs = torch.cat([torch.zeros(1, 32), vectors.vectors])
    row_vectors = vecs.repeat_interleave(n, dim=0)
    prompt_rows = torch.arange(n).repeat(vecs.shape[0])
    kw = dict(max_new_tokens=10, do_sample=seed > 0, seed=seed)
    cached = _call_tokens(tiny_tok_model, ps, row_vectors, prompt_rows, use_kv_cache=True, **kw)
    plain = _call_tokens(tiny_tok_model, ps, row_vectors, prompt_rows, use_kv_cache=False, **kw)
    assert torch.equal(cached, plain)
    assert tiny_tok_model.hook_dict[SITE.name].fwd_hooks == []


def test_eos_stops_a_row(tiny_tok_model):
    ps = PromptSet.from_texts(tiny_tok_model, ["the cat"])
    free = _greedy_by_hand(tiny_tok_model, ps.token_lists()[0], N_NEW, None)
    eos = free[2]
    first = free.index(eos)
    for use_cache in (True, False):
        out = _call_tokens(
            tiny_tok_model,
            ps,
            torch.zeros(1, 32),
            torch.tensor([0]),
            eos_token_id=eos,
            use_kv_cache=use_cache,
        )
        # Decoding stops once the only row has produced eos.
        assert out[0].tolist() == free[: first + 1]


def test_eos_pads_finished_rows(tiny_tok_model, vectors):
    ps = PromptSet.from_texts(tiny_tok_model, TEXTS)
    n = len(ps)
    free = _call_tokens(tiny_tok_model, ps, torch.zeros(n, 32), torch.arange(n))
    eos = int(free[0, 1])  # the second token of row 0
    out = _call_tokens(tiny_tok_model, ps, torch.zeros(n, 32), torch.arange(n), eos_token_id=eos)
    for r in range(n):
        row = free[r].tolist()
        if eos in row[: out.shape[1]]:
            stop = row.index(eos)
            assert out[r, : stop + 1].tolist() == row[: stop + 1]
            assert (out[r, stop:] == eos).all()
        else:
            assert out[r].tolist() == row[: out.shape[1]]


def test_sampling_is_reproducible(tiny_tok_model, vectors):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=2.0)
    a = generate_steered(tiny_tok_model, vectors, TEXTS, seed=11, **kw)
    b = generate_steered(tiny_tok_model, vectors, TEXTS, seed=11, **kw)
    c = generate_steered(tiny_tok_model, vectors, TEXTS, seed=12, **kw)
    assert a.steered == b.steered and a.unsteered == b.unsteered
    assert (a.steered, a.unsteered) != (c.steered, c.unsteered)
    greedy = generate_steered(tiny_tok_model, vectors, TEXTS, max_new_tokens=12)
    assert (a.steered, a.unsteered) != (greedy.steered, greedy.unsteered)
    top = dict(kw, top_p=0.9)
    assert (
        generate_steered(tiny_tok_model, vectors, TEXTS, seed=5, **top).steered
        == generate_steered(tiny_tok_model, vectors, TEXTS, seed=5, **top).steered
    )


def test_tiny_top_p_is_greedy(tiny_tok_model, vectors):
    greedy = generate_steered(tiny_tok_model, vectors, TEXTS, max_new_tokens=N_NEW)
    nucleus = generate_steered(
        tiny_tok_model, vectors, TEXTS, max_new_tokens=N_NEW, do_sample=True, top_p=1e-9, seed=4
    )
    assert nucleus.steered == greedy.steered and nucleus.unsteered == greedy.unsteered


def test_chat_prompts(tiny_tok_model, vectors):
    tok = tiny_tok_model.tokenizer
    gens = generate_steered(tiny_tok_model, vectors, ["hi"], chat=True, max_new_tokens=N_NEW)
    text = "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert gens.prompts == [text]
    row = tok(text, add_special_tokens=False)["input_ids"]
    assert gens.unsteered == [
        _text(tok, _greedy_by_hand(tiny_tok_model, row, N_NEW, tok.eos_token_id))
    ]


def test_prompt_set_input_and_site_override(tiny_tok_model, vectors):
    tok = tiny_tok_model.tokenizer
    ps = PromptSet.from_tokens(tiny_tok_model, [[20, 21, 22], [30]])
    site = HookSite(2, "attn_out")
    gens = generate_steered(
        tiny_tok_model, vectors, ps, indices=[1], site=site, max_new_tokens=N_NEW
    )
    assert gens.settings["site"] == site.name
    assert gens.prompts == [tok.decode([20, 21, 22]), tok.decode([30])]
    for i, row in enumerate(ps.token_lists()):
        tokens = torch.tensor([row])
        out: list[int] = []
        for _ in range(N_NEW):
            with steer(tiny_tok_model, site, vectors.vectors[1]):
                nxt = int(tiny_tok_model(tokens)[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
        assert gens.steered[0][i] == _text(tok, out)


def test_needs_a_tokenizer(tiny_model, vectors):
    with pytest.raises(ValueError, match="needs a model with a tokenizer"):
        generate_steered(tiny_model, vectors, "hi")


def test_missing_site_is_refused(tiny_tok_model, vectors):
    with pytest.raises(ValueError, match="does not exist"):
        generate_steered(tiny_tok_model, vectors, "hi", site=HookSite(9), max_new_tokens=1)


def test_steered_rows_equal_an_independent_weight_edit(tiny_tok_model, vectors):
    """Adding v at blocks.1.hook_resid_post is adding v to block 1's MLP bias b_out (the
    MLP output is summed into resid_post and nothing else reads it). A copy with that
    bias edit, decoded unsteered, must give the steered rows: no use of steer() here."""
    import copy

    for k in range(len(vectors)):
        edited = copy.deepcopy(tiny_tok_model)
        with torch.no_grad():
            edited.blocks[1].mlp.b_out += vectors.vectors[k]
        want = generate_steered(edited, vectors, TEXTS, indices=[], max_new_tokens=N_NEW)
        got = generate_steered(tiny_tok_model, vectors, TEXTS, indices=[k], max_new_tokens=N_NEW)
        assert got.steered[0] == want.unsteered
        assert got.steered[0] != got.unsteered  # the vector does change the text


# ---------------------------------------------------------------------- any perturbation
def _alone(model, texts, context=None):
    """Unsteered greedy completions, optionally inside a context manager."""
    if context is None:
        return generate(model, None, texts, max_new_tokens=N_NEW).unsteered
    with context:
        return generate(model, None, texts, max_new_tokens=N_NEW).unsteered


def test_generate_takes_a_directional_ablation(tiny_tok_model, vectors):
    from melbo_lens.perturbations.directional import DirectionEdit, ablate_direction

    model = tiny_tok_model
    edit = DirectionEdit.ablation(vectors.vectors, d_model=32)
    gens = generate(model, edit, TEXTS, max_new_tokens=N_NEW)
    assert gens.unsteered == _alone(model, TEXTS)
    for k in range(len(edit)):  # each member in the batch = that ablation on its own
        assert gens.steered[k] == _alone(model, TEXTS, ablate_direction(model, vectors.vectors[k]))


def test_generate_takes_an_sae_feature_clamp(tiny_tok_model):
    from analysis.test_sae import make_sae  # a planted-decoder sae-lens SAE at blocks.1

    from melbo_lens.analysis.sae import FeatureClamp, clamp_feature

    model, sae = tiny_tok_model, make_sae()
    clamps = FeatureClamp(sae, [0, 17, 26], [30.0, 0.0, -30.0])
    gens = generate(model, clamps, TEXTS, max_new_tokens=N_NEW)
    assert gens.unsteered == _alone(model, TEXTS)
    for k, (f, v) in enumerate([(0, 30.0), (17, 0.0), (26, -30.0)]):
        assert gens.steered[k] == _alone(model, TEXTS, clamp_feature(model, sae, f, v))
    assert gens.steered[0] != gens.unsteered  # a strong clamp does change the text


def test_generate_with_no_perturbation_is_plain_decoding(tiny_tok_model):
    gens = generate(tiny_tok_model, None, TEXTS, max_new_tokens=N_NEW)
    tok = tiny_tok_model.tokenizer
    ps = PromptSet.from_texts(tiny_tok_model, TEXTS)
    expected = [
        _text(tok, _greedy_by_hand(tiny_tok_model, row, N_NEW, tok.eos_token_id))
        for row in ps.token_lists()
    ]
    assert gens.unsteered == expected
    assert gens.steered == [] and gens.indices == []
