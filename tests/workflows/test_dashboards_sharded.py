"""Sharded dashboards equal one pass: locally and on Ray (a local Ray instance)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from melbo_lens.analysis.sae.dashboards import feature_dashboards
from melbo_lens.workflows.dashboards import sharded_dashboards

TESTS = Path(__file__).resolve().parents[1]
TEXTS = [f"the {w} sat on the mat, {n} times" for w in ("cat", "dog", "bee") for n in range(6)]


def tiny_loader():
    sys.path.insert(0, str(TESTS))
    from conftest import make_tiny, make_tiny_tokenizer

    torch.set_num_threads(1)
    model = make_tiny(n_layers=4)
    model.set_tokenizer(make_tiny_tokenizer())
    return model


def tiny_sae():
    sys.path.insert(0, str(TESTS))
    from analysis.test_sae import make_sae

    return make_sae()


def _same(a, b) -> None:
    for name in ("top_values", "top_locations", "sample_locations", "hist", "corr_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.corr_values, b.corr_values, equal_nan=True)
    assert a.latents == b.latents and a.n_tokens == b.n_tokens
    assert a.info["key"] == b.info["key"]


def test_local_shards_equal_one_pass():
    model, sae = tiny_loader(), tiny_sae()
    one = feature_dashboards(model, sae, TEXTS, ctx=16, cache=False, progress=False, corr_every=2)
    for shards in (1, 4):
        merged = sharded_dashboards(
            lambda: model, sae, TEXTS, shards=shards, ctx=16, corr_every=2, progress=False
        )
        _same(merged, one)
    with pytest.raises(ValueError, match="executor must be"):
        sharded_dashboards(lambda: model, sae, TEXTS, shards=2, executor="dask")


def test_ray_shards_equal_one_pass():
    ray = pytest.importorskip("ray")
    path = os.pathsep.join(
        [str(TESTS), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    )
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
    )
    try:
        model, sae = tiny_loader(), tiny_sae()
        one = feature_dashboards(model, sae, TEXTS, ctx=16, cache=False, progress=False)
        remote = sharded_dashboards(
            tiny_loader, sae, TEXTS, shards=3, executor="ray", workers=2, ctx=16, progress=False
        )
        _same(remote, one)
        assert remote.info["executor"] == "ray"
    finally:
        ray.shutdown()
