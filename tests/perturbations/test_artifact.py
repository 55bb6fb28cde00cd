"""SteeringVectors: exact save/load, atomic writes, refusing pickles and foreign files."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import melbo_lens.core.io as artifacts
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.artifact import ArtifactError
from melbo_lens.perturbations.vectors import FORMAT, SteeringVectors


def _full(rng, n=3, d=32, dtype=torch.float32) -> SteeringVectors:
    prompts = PromptSet.from_tokens(None, [[1, 2, 3], [4, 5]], target_positions=slice(-1, None))
    return SteeringVectors(
        # on the sphere of config.radius, as MELBO's vectors are (load checks it)
        vectors=(4.0 * torch.nn.functional.normalize(torch.randn(n, d, generator=rng), dim=-1)).to(
            dtype
        ),
        site=HookSite(1, "resid_post"),
        target=HookSite(3, "mlp_out"),
        method="melbo",
        config={
            "radius": 4.0,
            "lr": 0.0011234567890123,
            "steps": 5,
            "orthogonal": "sequential",
            "source": {"layer": 1, "point": "resid_post"},
            "betas": [0.9, 0.98],
            "flag": True,
            "nothing": None,
        },
        model_name="tiny-rotary",
        prompts=prompts.to_dict(),
        losses=torch.randn(n, 5, generator=rng),
        objective=torch.randn(n, generator=rng),
        steps_done=torch.tensor([5, 5, 2][:n], dtype=torch.long),
        metadata={"note": "héllo ✓", "nested": {"a": [1, 2, {"b": 1e-30}]}},
        resume_state={"opt.exp_avg": torch.randn(n, d, generator=rng), "step": torch.tensor(7)},
    )


def _assert_same(a: SteeringVectors, b: SteeringVectors) -> None:
    assert a.vectors.dtype == b.vectors.dtype
    assert torch.equal(a.vectors, b.vectors)
    for name in ("losses", "objective", "steps_done"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.resume_state.keys() == b.resume_state.keys()
    for k in a.resume_state:
        assert torch.equal(a.resume_state[k], b.resume_state[k]), k
    assert a.site == b.site and a.target == b.target
    assert a.method == b.method and a.model_name == b.model_name
    assert a.config == b.config
    assert a.prompts == b.prompts
    assert a.metadata == b.metadata


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_save_load_round_trip_is_exact(tmp_path, rng, dtype):
    sv = _full(rng, dtype=dtype)
    out = sv.save(tmp_path / "v.safetensors")
    assert out == tmp_path / "v.safetensors"
    back = SteeringVectors.load(out)
    _assert_same(sv, back)
    assert back.complete is False  # steps_done [5, 5, 2] < steps 5
    # The prompts come back as a usable PromptSet.
    ps = PromptSet.from_dict(back.prompts)
    assert ps.token_lists() == [[1, 2, 3], [4, 5]] and ps.target_lists() == [[2], [1]]


def test_minimal_round_trip(tmp_path):
    sv = SteeringVectors(torch.eye(4)[:2] * 3.0, HookSite(0, "resid_pre"))
    back = SteeringVectors.load(sv.save(str(tmp_path / "sub" / "dir" / "m.safetensors")))
    _assert_same(sv, back)
    assert back.target is None and back.losses is None and back.resume_state == {}
    assert back.complete


def test_save_overwrites(tmp_path, rng):
    path = tmp_path / "v.safetensors"
    _full(rng).save(path)
    second = SteeringVectors(torch.ones(1, 8), HookSite(2), method="random")
    second.save(path)
    _assert_same(second, SteeringVectors.load(path))


def test_non_json_metadata_is_refused_and_nothing_written(tmp_path):
    sv = SteeringVectors(torch.ones(1, 4), HookSite(0), metadata={"bad": object()})
    with pytest.raises(TypeError, match="cannot store object"):
        sv.save(tmp_path / "v.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- atomic writes


def test_no_temporary_files_left(tmp_path, rng):
    _full(rng).save(tmp_path / "a.safetensors")
    _full(rng).save(tmp_path / "a.safetensors")
    _full(rng).save(tmp_path / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_the_old_file(tmp_path, rng, monkeypatch, exc):
    path = tmp_path / "v.safetensors"
    old = _full(rng)
    old.save(path)
    old_bytes = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half-written temporary file, then the failure
            f.write(b"partial garbage")
        raise exc

    monkeypatch.setattr(artifacts, "save_file", broken_save_file)
    with pytest.raises(type(exc)):
        SteeringVectors(torch.zeros(1, 32), HookSite(0)).save(path)
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]
    monkeypatch.undo()
    _assert_same(old, SteeringVectors.load(path))


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save_file(tensors, filename, metadata=None):
        raise OSError("no space left")

    monkeypatch.setattr(artifacts, "save_file", broken_save_file)
    with pytest.raises(OSError, match="no space"):
        SteeringVectors(torch.zeros(1, 4), HookSite(0)).save(tmp_path / "v.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- refusing files


class _CreatesMarker:
    """Unpickling this object creates a file: proof that something was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_pickle(kind: str, path, marker) -> None:
    evil = _CreatesMarker(str(marker))
    if kind == "torch_zip":
        torch.save({"vectors": torch.ones(2, 4), "evil": evil}, path)
    elif kind == "torch_legacy":
        torch.save(
            {"vectors": torch.ones(2, 4), "evil": evil},
            path,
            _use_new_zipfile_serialization=False,
        )
    elif kind == "torch_tensor":
        torch.save(torch.ones(2, 4), path)
    elif kind.startswith("pickle_"):
        protocol = int(kind.split("_")[1])
        path.write_bytes(pickle.dumps({"evil": evil}, protocol=protocol))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["torch_zip", "torch_legacy", "torch_tensor", "pickle_0", "pickle_2", "pickle_5"]
)
def test_pickles_are_refused_and_never_unpickled(tmp_path, kind):
    path = tmp_path / "v.safetensors"
    marker = tmp_path / "UNPICKLED"
    _write_pickle(kind, path, marker)
    assert not marker.exists()
    if kind.startswith("pickle_"):
        # Sanity check of the trap itself: a real unpickle would create the marker.
        probe = tmp_path / "probe"
        pickle.loads(pickle.dumps(_CreatesMarker(str(probe)))).close()
        assert probe.exists()
    with pytest.raises(ArtifactError) as err:
        SteeringVectors.load(path)
    assert not marker.exists()
    if kind != "pickle_0":  # protocol 0 has no magic byte; it fails as "not safetensors"
        assert "pickle" in str(err.value) and "never unpickles" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no artifact at"):
        SteeringVectors.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("size", [0, 3, 8, 100, 4096])
def test_random_bytes_are_refused(tmp_path, size):
    gen = torch.Generator().manual_seed(size)
    data = bytes(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).tolist())
    path = tmp_path / "v.safetensors"
    path.write_bytes(data)
    with pytest.raises(ArtifactError):
        SteeringVectors.load(path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -1])
def test_truncated_file_is_refused(tmp_path, rng, keep):
    path = tmp_path / "v.safetensors"
    _full(rng).save(path)
    data = path.read_bytes()
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep)
    path.write_bytes(data[:cut])
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        SteeringVectors.load(path)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"vectors": torch.ones(2, 4)}, str(path))
    with pytest.raises(ArtifactError, match="not a melbo_lens artifact") as err:
        SteeringVectors.load(path)
    assert "None" in str(err.value)  # says which format it found
    save_file({"vectors": torch.ones(2, 4)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="found format 'pt'"):
        SteeringVectors.load(path)


def _save_foreign(path, tensors, metadata) -> None:
    """save_file, padded so the header length does not begin with a pickle-like byte."""
    for pad in range(64):
        save_file(tensors, str(path), metadata={**metadata, "pad": "x" * pad})
        if path.read_bytes()[:1] != b"\x80":
            return
    raise AssertionError("could not avoid a 0x80 first byte")


def test_corrupt_metadata_is_refused(tmp_path):
    path = tmp_path / "v.safetensors"
    _save_foreign(path, {"vectors": torch.ones(2, 4)}, {"format": FORMAT})
    with pytest.raises(ArtifactError, match="corrupt melbo_lens metadata"):
        SteeringVectors.load(path)
    _save_foreign(path, {"vectors": torch.ones(2, 4)}, {"format": FORMAT, "json": "{oops"})
    with pytest.raises(ArtifactError, match="corrupt melbo_lens metadata"):
        SteeringVectors.load(path)


def test_artifact_whose_header_length_begins_with_0x80_loads(tmp_path):
    # A safetensors file starts with its header length (u64, little endian). Lengths
    # of 128 mod 256 make the first byte 0x80, the pickle magic byte; such a file is
    # still a valid artifact of ours (about 1 in 32 headers, as they are 8-aligned).
    path = tmp_path / "v.safetensors"
    for n in range(512):
        sv = SteeringVectors(torch.ones(1, 4), HookSite(0), metadata={"note": "x" * n})
        sv.save(path)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        raise AssertionError("no metadata length gave a 0x80 first byte")
    _assert_same(sv, SteeringVectors.load(path))


def test_artifact_without_vectors_is_refused(tmp_path):
    # Right format tag and valid JSON, but the vectors tensor is missing.
    path = tmp_path / "v.safetensors"
    meta = {"format": FORMAT, "json": json.dumps({"site": {"layer": 0, "point": "resid_post"}})}
    _save_foreign(path, {"losses": torch.ones(2, 4)}, meta)
    with pytest.raises(ArtifactError):
        SteeringVectors.load(path)


def test_artifact_error_is_a_value_error():
    assert issubclass(ArtifactError, ValueError)


# ---------------------------------------------------------------------- list-like


def test_indexing_and_slicing(rng):
    sv = _full(rng, n=3)
    one = sv[1]
    assert len(one) == 1
    assert torch.equal(one.vectors, sv.vectors[1:2])
    assert torch.equal(one.losses, sv.losses[1:2])
    assert torch.equal(one.objective, sv.objective[1:2])
    assert torch.equal(one.steps_done, sv.steps_done[1:2])
    assert one.resume_state == {}
    assert one.site == sv.site and one.target == sv.target and one.config == sv.config
    assert torch.equal(sv[-1].vectors, sv.vectors[2:3])
    sub = sv[[2, 0]]
    assert torch.equal(sub.vectors, sv.vectors[[2, 0]])
    assert torch.equal(sub.steps_done, torch.tensor([2, 5]))
    tail = sv[1:]
    assert len(tail) == 2 and torch.equal(tail.objective, sv.objective[1:])
    assert len(sv[::2]) == 2
    for bad in (3, -4):
        with pytest.raises(IndexError, match="out of range for 3 vectors"):
            sv[bad]
    assert [v.tolist() for v in sv] == sv.vectors.tolist()
    assert sv.d_model == 32
    torch.testing.assert_close(sv.radius, sv.vectors.norm(dim=-1))
    assert "n=3" in repr(sv) and "blocks.1.hook_resid_post" in repr(sv)


def test_inconsistent_rows_are_refused():
    with pytest.raises(ValueError, match="losses has 2 rows but there are 3 vectors"):
        SteeringVectors(torch.ones(3, 4), HookSite(0), losses=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"vectors must be \[n, d_model\]"):
        SteeringVectors(torch.ones(4), HookSite(0))


def test_save_load_slice(tmp_path, rng):
    sv = _full(rng)
    part = sv[1:]
    _assert_same(part, SteeringVectors.load(part.save(tmp_path / "part.safetensors")))


# ---------------------------------------------------------------------- apply


def test_apply_steers_and_cleans_up(tiny_model, rng):
    sv = SteeringVectors(torch.randn(3, 32, generator=rng) * 4, HookSite(1))
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    name = sv.site.name
    base_logits, base = tiny_model.run_with_cache(tokens, names_filter=[name])
    with sv.apply(tiny_model, 2, scale=0.5) as m:
        assert m is tiny_model
        logits, steered = tiny_model.run_with_cache(tokens, names_filter=[name])
    assert torch.equal(steered[name], base[name] + sv.vectors[2] * 0.5)
    assert not torch.allclose(logits, base_logits)
    assert tiny_model.hook_dict[name].fwd_hooks == []
    assert torch.equal(tiny_model(tokens), base_logits)

    # A list of indices: one vector per batch row.
    with sv.apply(tiny_model, [2, 0]):
        _, rows = tiny_model.run_with_cache(tokens, names_filter=[name])
    assert torch.equal(rows[name][0], base[name][0] + sv.vectors[2])
    assert torch.equal(rows[name][1], base[name][1] + sv.vectors[0])

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with sv.apply(tiny_model, 0):
            raise Boom
    assert tiny_model.hook_dict[name].fwd_hooks == []
    assert torch.equal(tiny_model(tokens), base_logits)


def test_loaded_vectors_steer_like_the_originals(tiny_model, rng, tmp_path):
    sv = SteeringVectors(torch.randn(2, 32, generator=rng), HookSite(2, "attn_out"))
    back = SteeringVectors.load(sv.save(tmp_path / "v.safetensors"))
    tokens = torch.tensor([[9, 8, 7]])
    with sv.apply(tiny_model, 1):
        a = tiny_model(tokens)
    with back.apply(tiny_model, 1):
        b = tiny_model(tokens)
    assert torch.equal(a, b)


def test_saved_file_is_plain_safetensors(tmp_path, rng):
    # Readable by any safetensors reader; no pickle anywhere in the file.
    from safetensors import safe_open

    path = _full(rng).save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT
        assert "vectors" in set(f.keys())
    assert os.path.getsize(path) > 0
    assert path.read_bytes()[:1] != b"\x80"


def test_saved_files_get_ordinary_permissions(tmp_path):
    """Atomic saves go through mkstemp (mode 0600); the result must be readable as if
    written by open(): 0666 & ~umask."""
    from melbo_lens.core.io import atomic_write_text

    umask = os.umask(0o022)
    try:
        vec = SteeringVectors(vectors=torch.randn(2, 4), site=HookSite(0))
        paths = [vec.save(tmp_path / "v.safetensors"), atomic_write_text(tmp_path / "a.txt", "x")]
        for path in paths:
            assert os.stat(path).st_mode & 0o777 == 0o644, path
        assert (tmp_path / "a.txt").read_text() == "x"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "v.safetensors"]
    finally:
        os.umask(umask)
