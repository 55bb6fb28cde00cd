"""Activation memory: the estimate against a measured peak, and splitting a step into
passes (gradient accumulation) that gives the same result with a lower peak."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from melbo_lens.core.memory import pass_memory, rows_per_pass

# One forward+backward through 5 blocks of a d_model=256 model in a fresh process; prints
# the measured peak RSS growth and the estimate (bytes). `split` rows per pass (0: all).
PROBE = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from melbo_lens import HookSite, MelboConfig, PromptSet, train_steering_vectors
    from melbo_lens.core.memory import pass_memory, peak_bytes
    rows, pos, split = 16, 128, int(sys.argv[1])
    cfg = HookedTransformerConfig(n_layers=6, d_model=256, n_ctx=512, d_head=32, n_heads=8,
        d_mlp=1024, d_vocab=100, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="rotary", seed=0)
    model = HookedTransformer(cfg).eval()
    ps = PromptSet.from_tokens(model, torch.randint(0, 100, (rows, pos),
        generator=torch.Generator().manual_seed(0)).tolist())
    config = MelboConfig(HookSite(0), HookSite(5), n_vectors=1, radius=4.0, steps=1,
        starts_per_vector=1)
    before = peak_bytes("cpu")  # this process's own high-water mark (VmHWM)
    train_steering_vectors(model, ps, config, progress=False, max_rows_per_pass=split or None)
    print(peak_bytes("cpu") - before, pass_memory(model, 5, pos).bytes_for(split or rows))
    """
)


def _probe(split: int) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(split)], capture_output=True, text=True, check=True
    )
    measured, estimate = (int(x) for x in out.stdout.split())
    return measured, estimate


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_estimate_matches_the_measured_peak_and_splitting_lowers_it():
    whole, estimate = _probe(0)
    # the estimate (16·d_model + 2·d_mlp activations and 3·heads·pos² scores per token and
    # block) came within 0.85-1.17 of the measured peak over three shapes; allow 0.6-1.6
    assert 0.6 < estimate / whole < 1.6, (estimate, whole)
    quarter, _ = _probe(4)
    # the unsplit peak is bimodal under glibc's dynamic mmap threshold (346 or 532 MB in
    # back-to-back runs of this probe) while 4-row passes peak at ~185 MB: the ratio
    # ranged 0.35-0.55, so 0.5 failed now and then; 0.7 still fails if splitting stopped
    # lowering the peak (the fixed part is ~90 MB of the 185)
    assert quarter < 0.7 * whole, (quarter, whole)


def test_rows_per_pass_fails_early_naming_the_need_and_the_knob(monkeypatch):
    model = type("M", (), {})()
    model.cfg = type("C", (), dict(d_model=256, d_mlp=1024, n_heads=8, dtype=torch.float32))()
    memory = pass_memory(model, n_blocks=5, positions=128)
    monkeypatch.setattr("melbo_lens.core.memory.free_bytes", lambda device: 10 * memory.per_row)
    assert rows_per_pass(memory, 4, None, "cpu") is None  # fits in one pass
    assert rows_per_pass(memory, 64, "auto", "cpu") == 6  # 60% of 10 rows' worth
    assert rows_per_pass(memory, 64, 3, "cpu") == 3
    with pytest.raises(MemoryError, match=r"64 rows = vectors x prompts.*max_rows_per_pass=6"):
        rows_per_pass(memory, 64, None, "cpu")
    monkeypatch.setattr("melbo_lens.core.memory.free_bytes", lambda device: memory.per_row // 2)
    with pytest.raises(MemoryError, match="one row alone does not fit"):
        rows_per_pass(memory, 64, "auto", "cpu")
