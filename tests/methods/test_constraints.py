import torch

from melbo_lens.methods.constraints import (
    gram_schmidt,
    project_out,
    project_out_earlier,
    tangent_project,
    to_sphere,
)


def test_to_sphere_norms(rng):
    v = torch.randn(5, 7, generator=rng)
    out = to_sphere(v, 3.5)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((5,), 3.5))
    torch.testing.assert_close(
        torch.nn.functional.normalize(out, dim=-1), torch.nn.functional.normalize(v, dim=-1)
    )


def test_tangent_projection_is_orthogonal_to_vector(rng):
    v, g = torch.randn(4, 6, generator=rng), torch.randn(4, 6, generator=rng)
    t = tangent_project(g, v)
    assert (t * v).sum(-1).abs().max() < 1e-5
    # the removed part is parallel to v
    removed = g - t
    cos = torch.nn.functional.cosine_similarity(removed, v, dim=-1).abs()
    torch.testing.assert_close(cos, torch.ones(4))


def test_gram_schmidt_matches_classical_loop(rng):
    v = torch.randn(4, 9, generator=rng, dtype=torch.float64)
    expected = []
    for row in v:
        for e in expected:
            row = row - (row @ e) * e
        expected.append(row / row.norm())
    torch.testing.assert_close(gram_schmidt(v), torch.stack(expected))


def test_project_out_and_earlier(rng):
    basis = gram_schmidt(torch.randn(3, 8, generator=rng, dtype=torch.float64))
    g = torch.randn(3, 8, generator=rng, dtype=torch.float64)
    out = project_out(g, basis[:2])
    assert (out @ basis[:2].T).abs().max() < 1e-12
    earlier = project_out_earlier(g, basis)
    # row 0 untouched; row k orthogonal to rows < k
    torch.testing.assert_close(earlier[0], g[0])
    assert abs(float(earlier[1] @ basis[0])) < 1e-12
    assert (earlier[2] @ basis[:2].T).abs().max() < 1e-12
    torch.testing.assert_close(earlier[2] @ basis[2], g[2] @ basis[2])
