"""`melbo-lens explain` writes decomposition tables that recover planted features."""

from __future__ import annotations

import csv
import json

from test_sae import COEFS, PLANTED, SITE, make_sae, planted_vector

from melbo_lens.cli import main
from melbo_lens.perturbations.vectors import SteeringVectors


def test_explain_writes_tables_that_recover_planted_features(tmp_path, capsys):
    make_sae().save_model(tmp_path / "sae")
    noisy, _ = planted_vector(noise=0.0)
    SteeringVectors(noisy[None], SITE).save(tmp_path / "v.safetensors")
    code = main(
        [
            "explain",
            str(tmp_path / "v.safetensors"),
            "--sae",
            str(tmp_path / "sae"),
            "--top-k",
            "3",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "decomposition.csv")))
    got = {int(r["feature"]): float(r["coefficient"]) for r in rows}
    assert set(got) == set(PLANTED)
    for feature, coef in zip(PLANTED, COEFS, strict=True):
        assert abs(got[feature] - coef) < 1e-4
    data = json.loads((tmp_path / "out" / "decomposition.json").read_text())
    assert data["0"]["explained"] > 0.9999
    assert "tables ->" in capsys.readouterr().out


def test_explain_refuses_a_site_mismatch(tmp_path, capsys):
    make_sae().save_model(tmp_path / "sae")
    noisy, _ = planted_vector()
    SteeringVectors(noisy[None], SITE.__class__(SITE.layer + 2)).save(tmp_path / "v.safetensors")
    code = main(
        [
            "explain",
            str(tmp_path / "v.safetensors"),
            "--sae",
            str(tmp_path / "sae"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "site" in capsys.readouterr().err


def test_explain_writes_dashboards_and_cards_and_claims_its_out(tmp_path, capsys):
    """On the packaged toy model: dashboards of the named latents, a card per vector, one
    offline page; a second run is refused without --overwrite, and --overwrite removes
    what the earlier run wrote (no stale feature_effects.json beside new tables)."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from melbo_lens.analysis.sae.dashboard_result import FeatureDashboards
    from melbo_lens.core.sites import HookSite

    site = HookSite(1)
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=128, d_sae=32, metadata=SAEMetadata(hook_name=site.name, model_name="x")
        )
    )
    sae.save_model(tmp_path / "sae")
    gen = torch.Generator().manual_seed(0)
    SteeringVectors(torch.randn(2, 128, generator=gen), site, target=HookSite(3)).save(
        tmp_path / "v.safetensors"
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a=1+2, b=3+4. a*b=?\n\na=5+0, b=2+2. a*b=? yes\n\nhello world\n" * 8)
    base = [
        "explain",
        str(tmp_path / "v.safetensors"),
        "--sae",
        str(tmp_path / "sae"),
        "--model",
        "planted-arithmetic",
        "--allow-site-mismatch",  # the SAE names another model
        "--corpus",
        str(corpus),
        "--top-k",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*base, "--prompt", "a=1+1, b=2+2. a*b=?", "--no-chat"]) == 0
    out = tmp_path / "out"
    assert (out / "feature_effects.json").is_file()
    dash = FeatureDashboards.load(out / "dashboards" / site.name)
    feats = {
        f
        for d in json.loads((out / "decomposition.json").read_text()).values()
        for f in d["features"]
    }
    assert set(dash.latents) == feats
    cards = json.loads((out / "cards.json").read_text())
    assert [c["index"] for c in cards] == [0, 1] and all(c["promoted"] for c in cards)
    page = (out / "explain.html").read_text()
    assert "latent-blocks-1-hook_resid_post-" in page and "http" not in page
    assert main(base) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*base, "--overwrite"]) == 0
    assert not (out / "feature_effects.json").exists()  # the earlier run's table is gone
    assert json.loads((out / "explain.json").read_text())["files"][-1] == "explain.html"


def test_explain_names_a_bad_index(tmp_path, capsys):
    make_sae().save_model(tmp_path / "sae")
    noisy, _ = planted_vector()
    SteeringVectors(noisy[None], SITE).save(tmp_path / "v.safetensors")
    base = ["explain", str(tmp_path / "v.safetensors"), "--sae", str(tmp_path / "sae")]
    base += ["--out", str(tmp_path / "out")]
    assert main([*base, "--index", "9"]) == 2
    assert "--index [9] out of range: the file holds 1 vectors (0..0)" in capsys.readouterr().err
    assert main([*base, "--index", "a", "--overwrite"]) == 2
    assert "--index takes comma-separated integers, got 'a'" in capsys.readouterr().err
