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
