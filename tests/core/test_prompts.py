"""PromptSet: padding, masks, target positions, views, and batch-invariance on a model."""

from __future__ import annotations

import pytest
import torch

from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite
from melbo_lens.methods.objectives import melbo_objective_per_prompt
from melbo_lens.perturbations.vectors import steer

ROWS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def _bools(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------------- from_tokens


def test_from_tokens_right_pads_lists():
    ps = PromptSet.from_tokens(None, ROWS)
    assert ps.tokens.dtype == torch.long
    assert ps.tokens.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]]
    assert torch.equal(ps.attention_mask, _bools([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]))
    # None = every real token is a target.
    assert torch.equal(ps.target_mask, ps.attention_mask)
    assert ps.lengths.tolist() == [4, 2, 3]
    assert len(ps) == 3
    assert ps.token_lists() == ROWS
    assert ps.texts is None


def test_from_tokens_pad_token_id():
    ps = PromptSet.from_tokens(None, ROWS, pad_token_id=42)
    assert ps.tokens.tolist() == [[5, 6, 7, 8], [9, 10, 42, 42], [11, 12, 13, 42]]


def test_from_tokens_uses_the_tokenizer_pad_id(tiny_tok_model):
    pad = tiny_tok_model.tokenizer.pad_token_id
    assert pad == 3
    ps = PromptSet.from_tokens(tiny_tok_model, [[7, 8, 9], [10]])
    assert ps.tokens.tolist() == [[7, 8, 9], [10, pad, pad]]


def test_from_tokens_single_row_tensor():
    ps = PromptSet.from_tokens(None, torch.tensor([4, 5, 6]))
    assert ps.tokens.tolist() == [[4, 5, 6]]
    assert ps.attention_mask.all()


def test_from_tokens_tensor_with_left_padded_mask_is_repadded_right():
    tokens = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    ps = PromptSet.from_tokens(None, tokens, attention_mask=mask, pad_token_id=99)
    assert ps.tokens.tolist() == [[5, 6, 99, 99], [7, 8, 9, 10], [11, 12, 13, 99]]
    assert ps.token_lists() == [[5, 6], [7, 8, 9, 10], [11, 12, 13]]
    assert ps.lengths.tolist() == [2, 4, 3]


def test_attention_mask_needs_a_tensor():
    with pytest.raises(ValueError, match="only accepted with a token tensor"):
        PromptSet.from_tokens(None, ROWS, attention_mask=torch.ones(3, 4, dtype=torch.bool))


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        PromptSet.from_tokens(None, [[1, 2], [], [3]])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        PromptSet.from_tokens(None, torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 0]]))


def test_empty_prompt_list_is_refused():
    with pytest.raises(ValueError, match="no prompts given"):
        PromptSet.from_tokens(None, [])


def test_direct_construction_checks_invariants():
    tokens = torch.tensor([[1, 2, 0]])
    attn = _bools([[1, 1, 0]])
    with pytest.raises(ValueError, match="must be real tokens"):
        PromptSet(tokens, attn, _bools([[0, 0, 1]]))
    with pytest.raises(ValueError, match="right-padded"):
        PromptSet(tokens, _bools([[0, 1, 1]]), _bools([[0, 1, 0]]))
    with pytest.raises(ValueError, match="bool tensor"):
        PromptSet(tokens, attn.long(), attn)
    with pytest.raises(ValueError, match="at least one prompt"):
        empty = torch.zeros(0, 3, dtype=torch.bool)
        PromptSet(torch.zeros(0, 3, dtype=torch.long), empty, empty)


# ---------------------------------------------------------------------- target positions


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, [[0, 1, 2, 3], [0, 1], [0, 1, 2]]),
        (slice(-1, None), [[3], [1], [2]]),
        (slice(-2, None), [[2, 3], [0, 1], [1, 2]]),
        (slice(1, None), [[1, 2, 3], [1], [1, 2]]),
        (slice(0, None, 2), [[0, 2], [0], [0, 2]]),
        ([0], [[0], [0], [0]]),
        ([-1], [[3], [1], [2]]),
        ([0, -1], [[0, 3], [0, 1], [0, 2]]),
        ([1, -1, 1], [[1, 3], [1], [1, 2]]),  # duplicates collapse
        ((0, -2), [[0, 2], [0], [0, 1]]),
    ],
)
def test_target_positions_shared_by_all_prompts(spec, expected):
    ps = PromptSet.from_tokens(None, ROWS, target_positions=spec)
    assert ps.target_lists() == expected
    assert not (ps.target_mask & ~ps.attention_mask).any()


def test_target_positions_per_prompt():
    spec = [slice(-2, None), [0], None]
    ps = PromptSet.from_tokens(None, ROWS, target_positions=spec)
    assert ps.target_lists() == [[2, 3], [0], [0, 1, 2]]
    assert torch.equal(ps.target_mask, _bools([[0, 0, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]))
    assert ps.target_spec == spec


def test_target_positions_per_prompt_lists_of_ints():
    ps = PromptSet.from_tokens(None, ROWS, target_positions=[[1, -1], [-2], (2,)])
    assert ps.target_lists() == [[1, 3], [0], [2]]


def test_int_list_with_n_entries_is_shared_not_per_prompt():
    # [0, 1] for two prompts is one list of positions, applied to each prompt.
    ps = PromptSet.from_tokens(None, [[1, 2, 3], [4, 5]], target_positions=[0, 1])
    assert ps.target_lists() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("spec", [[2], [-3], [0, 3]])
def test_out_of_range_positions_are_refused(spec):
    # Prompt 1 has only two tokens.
    with pytest.raises(ValueError, match=r"outside prompt 1, which has 2 tokens"):
        PromptSet.from_tokens(None, ROWS, target_positions=spec)


def test_out_of_range_position_in_per_prompt_list():
    with pytest.raises(ValueError, match=r"target position 3 is outside prompt 2"):
        PromptSet.from_tokens(None, ROWS, target_positions=[[0], [1], [3]])


@pytest.mark.parametrize("spec", [slice(3, None), slice(0, 0), []])
def test_no_target_positions_is_refused(spec):
    with pytest.raises(ValueError, match="has no target positions"):
        PromptSet.from_tokens(None, ROWS, target_positions=spec)


@pytest.mark.parametrize("spec", [[1.0], [True], ["0"]])
def test_non_int_positions_are_refused(spec):
    with pytest.raises(TypeError, match="is not an int"):
        PromptSet.from_tokens(None, ROWS, target_positions=spec)


# ---------------------------------------------------------------------- views


def test_left_padded():
    ps = PromptSet.from_tokens(None, ROWS, pad_token_id=77)
    tokens, mask = ps.left_padded(pad_token_id=99)
    assert tokens.tolist() == [[5, 6, 7, 8], [99, 99, 9, 10], [99, 11, 12, 13]]
    assert torch.equal(mask, _bools([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]))
    # Every row keeps its tokens, in order, at the right end.
    for row, t, m in zip(ROWS, tokens, mask, strict=True):
        assert t[m].tolist() == row


def test_left_padded_default_pad_and_full_rows():
    ps = PromptSet.from_tokens(None, [[1, 2], [3, 4]])
    tokens, mask = ps.left_padded()
    assert tokens.tolist() == [[1, 2], [3, 4]]
    assert mask.all()
    tokens, _ = PromptSet.from_tokens(None, [[8], [1, 2, 3]], pad_token_id=5).left_padded()
    assert tokens.tolist() == [[0, 0, 8], [1, 2, 3]]


def test_getitem():
    texts = ["a", "bb", "ccc"]
    ps = PromptSet.from_tokens(None, ROWS, target_positions=slice(-1, None), texts=texts)
    one = ps[1]
    assert len(one) == 1
    assert one.tokens.tolist() == [[9, 10]]  # trimmed to its own length
    assert one.target_lists() == [[1]]
    assert one.texts == ("bb",)
    assert ps[-1].tokens.tolist() == [[11, 12, 13]]
    sub = ps[[2, 1]]
    assert sub.tokens.tolist() == [[11, 12, 13], [9, 10, 0]]
    assert sub.attention_mask.tolist() == [[True, True, True], [True, True, False]]
    assert sub.target_lists() == [[2], [1]]
    assert sub.texts == ("ccc", "bb")
    tail = ps[1:]
    assert tail.token_lists() == ROWS[1:]
    assert tail.tokens.shape == (2, 3)
    assert ps[:1].token_lists() == ROWS[:1]
    with pytest.raises(IndexError):
        ps[3]


def test_to_dict_from_dict_round_trip():
    spec = [slice(-2, None), [0], [0, -1]]
    ps = PromptSet.from_tokens(None, ROWS, target_positions=spec, texts=["x", "y", "z"])
    data = ps.to_dict()
    assert data == {
        "tokens": ROWS,
        "targets": [[2, 3], [0], [0, 2]],
        "texts": ["x", "y", "z"],
        "labels": None,
        "target_spec": "[slice(-2, None, None), [0], [0, -1]]",  # as given, for a reader
    }
    back = PromptSet.from_dict(data)
    assert torch.equal(back.tokens, ps.tokens)
    assert torch.equal(back.attention_mask, ps.attention_mask)
    assert torch.equal(back.target_mask, ps.target_mask)
    assert back.texts == ps.texts


def test_round_trip_when_every_prompt_has_n_targets():
    # Each prompt lists exactly len(prompts) targets: must still round-trip per prompt.
    ps = PromptSet.from_tokens(None, [[1, 2, 3], [4, 5, 6]], target_positions=[[0, 1], [1, 2]])
    back = PromptSet.from_dict(ps.to_dict())
    assert back.target_lists() == [[0, 1], [1, 2]]


def test_to_moves_every_tensor():
    ps = PromptSet.from_tokens(None, ROWS, texts=["a", "b", "c"]).to("cpu")
    assert ps.tokens.device.type == "cpu" and ps.texts == ("a", "b", "c")


# ---------------------------------------------------------------------- batch invariance

PROMPTS = [[3, 14, 15, 9, 26, 5, 35, 8, 9], [7, 1], [27, 18, 28, 18, 28, 4], [45]]


def _solo_target_acts(model, row, source, target, vector):
    """Target activations of one prompt run alone through the full model."""
    tokens = torch.tensor([row])
    if vector is None:
        _, cache = model.run_with_cache(tokens, names_filter=[target.name])
    else:
        with steer(model, source, vector):
            _, cache = model.run_with_cache(tokens, names_filter=[target.name])
    return cache[target.name][0]


def test_batched_activations_match_solo_runs(tiny_model):
    ps = PromptSet.from_tokens(tiny_model, PROMPTS)
    names = [HookSite(layer, "resid_post").name for layer in range(4)]
    _, cache = tiny_model.run_with_cache(
        ps.tokens, attention_mask=ps.attention_mask.long(), names_filter=names
    )
    for i, row in enumerate(PROMPTS):
        _, solo = tiny_model.run_with_cache(torch.tensor([row]), names_filter=names)
        for name in names:
            torch.testing.assert_close(
                cache[name][i, : len(row)], solo[name][0], atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (HookSite(0), HookSite(2)),
        (HookSite(1, "resid_pre"), HookSite(3, "resid_post")),
        (HookSite(1, "attn_out"), HookSite(2, "mlp_out")),
    ],
)
def test_batched_melbo_objective_matches_solo_runs(tiny_model, rng, source, target):
    spec = [slice(-3, None), None, [0, -1], None]
    ps = PromptSet.from_tokens(tiny_model, PROMPTS, target_positions=spec)
    theta = torch.randn(2, tiny_model.cfg.d_model, generator=rng)
    theta = 3.0 * theta / theta.norm(dim=-1, keepdim=True)

    seg = Segment(tiny_model, source, target, ps)
    z = seg.run(theta)  # [k, n, pos, d]
    batched = melbo_objective_per_prompt(
        z, seg.unsteered.expand_as(z), ps.target_mask.expand(2, -1, -1)
    )
    assert batched.shape == (2, len(PROMPTS))

    for i, row in enumerate(PROMPTS):
        base = _solo_target_acts(tiny_model, row, source, target, None)
        torch.testing.assert_close(seg.unsteered[i, : len(row)], base, atol=1e-5, rtol=1e-5)
        solo_seg = Segment(tiny_model, source, target, ps[i])
        solo_obj = melbo_objective_per_prompt(
            solo_seg.run(theta),
            solo_seg.unsteered.expand(2, -1, -1, -1),
            ps[i].target_mask.expand(2, -1, -1),
        )
        for k in range(2):
            steered = _solo_target_acts(tiny_model, row, source, target, theta[k])
            torch.testing.assert_close(z[k, i, : len(row)], steered, atol=1e-5, rtol=1e-5)
            # Objective by hand: Σ over this prompt's targets of ||Δ||².
            targets = ps.target_lists()[i]
            by_hand = sum(float((steered[t] - base[t]).pow(2).sum()) for t in targets)
            assert float(batched[k, i]) == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
            assert float(solo_obj[k, 0]) == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
        assert by_hand > 1e-3  # the vector really moves the target


# ---------------------------------------------------------------------- texts / chat


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_from_texts(tiny_tok_model):
    tok = tiny_tok_model.tokenizer
    texts = ["Hello there", "hi"]
    ps = PromptSet.from_texts(tiny_tok_model, texts, target_positions=slice(-1, None))
    assert ps.texts == tuple(texts)
    # The tiny tokenizer is one token per (lower-cased) character.
    expected = [[tok.convert_tokens_to_ids(c) for c in t.lower()] for t in texts]
    assert ps.token_lists() == expected
    assert ps.tokens[1, 2:].tolist() == [tok.pad_token_id] * (len(texts[0]) - 2)
    assert ps.target_lists() == [[len(texts[0]) - 1], [1]]


def test_from_texts_bos(tiny_tok_model):
    tok = tiny_tok_model.tokenizer
    assert tiny_tok_model.cfg.default_prepend_bos is False
    assert PromptSet.from_texts(tiny_tok_model, "ab").token_lists() == [_ids(tok, "ab")]
    with_bos = PromptSet.from_texts(tiny_tok_model, "ab", prepend_bos=True)
    assert with_bos.token_lists() == [[tok.bos_token_id, *_ids(tok, "ab")]]


def test_from_texts_errors(tiny_tok_model, tiny_model):
    with pytest.raises(ValueError, match="no prompts given"):
        PromptSet.from_texts(tiny_tok_model, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        PromptSet.from_texts(tiny_tok_model, ["ok", ""])
    assert tiny_model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        PromptSet.from_texts(tiny_model, ["hello"])


def test_from_chat_single_string(tiny_tok_model):
    tok = tiny_tok_model.tokenizer
    ps = PromptSet.from_chat(tiny_tok_model, "Hi there")
    expected_text = "<|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert ps.texts == (expected_text,)
    assert ps.token_lists() == [_ids(tok, expected_text)]
    # Chat markers are single tokens.
    assert ps.token_lists()[0][0] == tok.convert_tokens_to_ids("<|user|>")
    assert ps.token_lists()[0][-2] == tok.convert_tokens_to_ids("<|assistant|>")


def test_from_chat_conversations(tiny_tok_model):
    tok = tiny_tok_model.tokenizer
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    one = PromptSet.from_chat(tiny_tok_model, conv, add_generation_prompt=False)
    text = "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n"
    assert one.texts == (text,)
    assert one.token_lists() == [_ids(tok, text)]

    two = PromptSet.from_chat(
        tiny_tok_model, [conv, [{"role": "user", "content": "yo"}]], target_positions=[-1]
    )
    texts = [text + "<|assistant|>\n", "<|user|>\nyo<|end|>\n<|assistant|>\n"]
    assert two.texts == tuple(texts)
    assert two.token_lists() == [_ids(tok, t) for t in texts]
    assert two.target_lists() == [[len(_ids(tok, texts[0])) - 1], [len(_ids(tok, texts[1])) - 1]]


def test_from_chat_errors(tiny_tok_model, tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="no conversations given"):
        PromptSet.from_chat(tiny_tok_model, [])
    with pytest.raises(ValueError, match="no tokenizer"):
        PromptSet.from_chat(tiny_model, "hi")
    monkeypatch.setattr(tiny_tok_model.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="no chat template"):
        PromptSet.from_chat(tiny_tok_model, "hi")


def test_from_chat_list_of_strings_is_one_user_turn_each(tiny_tok_model):
    many = PromptSet.from_chat(tiny_tok_model, ["Hi there", "ok"])
    one = PromptSet.from_chat(tiny_tok_model, "Hi there")
    two = PromptSet.from_chat(tiny_tok_model, [[{"role": "user", "content": "ok"}]])
    assert len(many) == 2
    assert many.texts == (one.texts[0], two.texts[0])
    assert many.token_lists() == [one.token_lists()[0], two.token_lists()[0]]
