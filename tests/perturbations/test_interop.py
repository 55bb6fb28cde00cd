"""Vectors in and out of steering-vectors, repeng's GGUF layout and llama.cpp, checked by
steering the same model with both libraries, and layer vectors as a perturbation."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_config

from melbo_lens import HookSite, MelboConfig, PromptSet, SteeringVectors, train_steering_vectors
from melbo_lens.core.io import OutputExists
from melbo_lens.perturbations.interop import (
    block_output_layer,
    export_control_vector,
    from_steering_vector,
    import_control_vector,
    to_steering_vector,
)
from melbo_lens.perturbations.layer_vectors import LayerVectors

HAS_SV = importlib.util.find_spec("steering_vectors") is not None


def test_layer_indexing_of_other_tools():
    assert block_output_layer(HookSite(5)) == 5
    assert block_output_layer(HookSite(5, "resid_pre")) == 4  # the same tensor
    for site in (HookSite(0, "resid_pre"), HookSite(3, "mlp_out"), HookSite(3, "attn_out")):
        with pytest.raises(ValueError, match="not the output of a decoder block"):
            block_output_layer(site)


def test_gguf_round_trip_in_repeng_layout(tmp_path):
    vecs = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    sv = SteeringVectors(vecs, HookSite(3, "resid_pre"))
    with pytest.raises(ValueError, match="pick one with index=0..2"):
        export_control_vector(sv, tmp_path / "a.gguf", model_hint="llama")
    path = export_control_vector(sv, tmp_path / "a.gguf", model_hint="llama", index=1)
    # read back with gguf's own reader, field by field as repeng's import_gguf reads it
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[-1]).decode() == "controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 1
    (tensor,) = reader.tensors
    assert tensor.name == "direction.2"  # blocks.3.hook_resid_pre = output of block 2
    np.testing.assert_array_equal(np.asarray(tensor.data, np.float32), vecs[1].numpy())
    back = import_control_vector(path)
    assert back.layers == (2,) and back.metadata["model_hint"] == "llama"
    assert torch.equal(back.vectors[0, 0], vecs[1])
    assert torch.equal(back.at(2).vectors[0], vecs[1])
    with pytest.raises(OutputExists, match="overwrite=True"):
        export_control_vector(sv, path, model_hint="llama", index=0)
    export_control_vector(sv, path, model_hint="llama", index=0, overwrite=True)
    assert torch.equal(import_control_vector(path).vectors[0, 0], vecs[0])


def test_llama_cpp_refuses_layer_0_and_so_does_the_export(tmp_path):
    sv = SteeringVectors(torch.ones(1, 8), HookSite(0))
    with pytest.raises(ValueError, match="llama.cpp does not accept a control vector for layer 0"):
        export_control_vector(sv, tmp_path / "x.gguf", model_hint="llama")
    assert not (tmp_path / "x.gguf").exists()


def test_import_refuses_another_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'llama', not a 'controlvector'"):
        import_control_vector(path)


def test_layer_vectors_add_at_every_layer(tiny_model):
    """Two layers' vectors together equal the two hooks written by hand; one layer equals
    `SteeringVectors` at that layer; rows take their own members."""
    gen = torch.Generator().manual_seed(1)
    vecs = torch.randn(2, 2, 32, generator=gen)
    lv = LayerVectors(vecs, (1, 2))
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])

    def add(v):
        return lambda act, hook: act + v

    with tiny_model.hooks(
        fwd_hooks=[
            ("blocks.1.hook_resid_post", add(vecs[1, 0])),
            ("blocks.2.hook_resid_post", add(vecs[1, 1])),
        ]
    ):
        by_hand = tiny_model(tokens)
    with lv.apply(tiny_model, 1):
        ours = tiny_model(tokens)
    assert torch.equal(ours, by_hand)
    with LayerVectors(vecs[:, :1], (1,)).apply(tiny_model, 0):
        one = tiny_model(tokens)
    with lv.at(1).apply(tiny_model, 0):
        as_sv = tiny_model(tokens)
    assert torch.equal(one, as_sv)
    with lv.apply(tiny_model, [None, 0]):
        rows = tiny_model(tokens)
    plain = tiny_model(tokens)
    assert torch.equal(rows[0], plain[0])
    with lv.apply(tiny_model, 0):
        assert torch.equal(rows[1], tiny_model(tokens)[1])
    assert not tiny_model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks  # removed
    with pytest.raises(IndexError, match="out of range"):
        lv.hooks(tiny_model, 2)


@pytest.mark.skipif(not HAS_SV, reason="pip install --no-deps steering-vectors==0.12.2")
def test_steering_vectors_round_trip():
    sv = SteeringVectors(torch.randn(2, 16), HookSite(6, "resid_pre"))
    theirs = to_steering_vector(sv, 1)
    assert theirs.layer_type == "decoder_block" and list(theirs.layer_activations) == [5]
    back = from_steering_vector(theirs)
    assert back.layers == (5,)
    assert torch.equal(back.vectors[0, 0], sv.vectors[1])


def test_a_model_with_attached_saes_is_refused_with_how_to_detach():
    from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    model = HookedSAETransformer(tiny_config())
    cfg = StandardSAEConfig(d_in=32, d_sae=64)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    model.add_sae(StandardSAE(cfg))
    prompts = PromptSet.from_tokens(model, [[1, 2, 3, 4]])
    config = MelboConfig(HookSite(0), HookSite(2), n_vectors=1, radius=1.0, steps=1)
    with pytest.raises(
        ValueError, match=r"SAEs attached at \['blocks.1.hook_resid_post'\].*reset_saes"
    ):
        train_steering_vectors(model, prompts, config, progress=False)
    with pytest.raises(ValueError, match="reset_saes"):
        SteeringVectors(torch.ones(1, 32), HookSite(0)).hooks(model, 0)
    model.reset_saes()
    sv = train_steering_vectors(model, prompts, config, progress=False)
    assert sv.complete
