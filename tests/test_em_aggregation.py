"""EM aggregation: EM semantics, the objective bound, momentum, gradient modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from emclip.nn.em_aggregation import EMAggregation, e_step, em_objective, m_step


def make(grad_mode="last", **kw):
    torch.manual_seed(0)
    args = {"in_channels": 12, "channels": 16, "num_bases": 6, "iterations": 3, "lam": 1.0, "momentum": 0.9}
    args["grad_mode"] = grad_mode
    args.update(kw)
    return EMAggregation(**args)


def test_shapes_responsibilities_sum_to_one_and_bases_unit_norm():
    em = make().eval()
    out = em(torch.randn(2, 12, 5, 7))
    assert out.features.shape == (2, 16, 5, 7)
    assert out.projected.shape == (2, 16, 5, 7)
    assert out.responsibilities.shape == (2, 6, 5, 7)
    assert out.bases.shape == (2, 16, 6)
    assert torch.allclose(out.responsibilities.sum(1), torch.ones(2, 5, 7), atol=1e-5)
    assert (out.responsibilities >= 0).all()
    assert torch.allclose(out.bases.norm(dim=1), torch.ones(2, 6), atol=1e-5)
    assert torch.allclose(em.bases.norm(dim=1), torch.ones(1, 6), atol=1e-5)


def test_forward_matches_the_em_equations():
    em = make(iterations=2, lam=0.7).eval()
    x = torch.randn(1, 12, 4, 4)
    out = em(x)
    feats = em.proj_in(x).flatten(2)
    mu = em.bases.clone()
    for _ in range(2):
        z = torch.softmax(0.7 * feats.transpose(1, 2) @ mu, dim=2)
        mu = F.normalize(feats @ (z / (1e-6 + z.sum(1, keepdim=True))), dim=1)
    assert torch.allclose(out.bases, mu, atol=1e-5)
    assert torch.allclose(out.responsibilities.flatten(2).transpose(1, 2), z, atol=1e-5)
    recon = (mu @ z.transpose(1, 2)).view(1, 16, 4, 4)
    assert torch.allclose(out.features, em.proj_in(x) + em.proj_out(F.relu(recon)), atol=1e-5)


@pytest.mark.parametrize("seed, lam", [(0, 1.0), (1, 0.3), (2, 5.0), (3, 20.0)])
def test_em_objective_never_decreases(seed, lam):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, 50, generator=gen) * 2.0 + 0.5  # not normalised: the bound holds for any x
    mu = F.normalize(torch.randn(3, 8, 5, generator=gen), dim=1)
    values = [em_objective(x, mu, lam)]
    for _ in range(10):
        mu = m_step(x, e_step(x, mu, lam))
        values.append(em_objective(x, mu, lam))
    values = torch.stack(values)  # [T+1, B]
    assert (values[1:] - values[:-1] >= -1e-4 * values.abs()[1:]).all(), values
    assert (values[-1] > values[0]).all()  # it actually moves from a random start


def test_momentum_update_only_in_train_mode():
    em = make()
    x = torch.randn(2, 12, 6, 6)
    before = em.bases.clone()
    em.eval()
    with torch.no_grad():
        em(x)
    assert torch.equal(em.bases, before)
    em.train()
    with torch.no_grad():
        out = em(x)
    expected = F.normalize(0.9 * before + 0.1 * out.bases.mean(0, keepdim=True), dim=1)
    assert torch.allclose(em.bases, expected, atol=1e-6)
    assert not torch.allclose(em.bases, before)
    assert torch.allclose(em.bases.norm(dim=1), torch.ones(1, 6), atol=1e-5)


def test_eval_starts_every_image_from_the_stored_bases():
    em = make().eval()
    a, b = torch.randn(1, 12, 5, 5), torch.randn(1, 12, 5, 5)
    with torch.no_grad():
        alone = em(a)
        pair = em(torch.cat([a, b]))
    assert torch.allclose(pair.responsibilities[:1], alone.responsibilities, atol=1e-6)
    assert torch.allclose(pair.features[:1], alone.features, atol=1e-6)


@pytest.mark.parametrize("grad_mode, reaches", [("none", False), ("last", True), ("full", True)])
def test_gradient_through_the_em_path_depends_on_grad_mode(grad_mode, reaches):
    em = make(grad_mode).train()
    out = em(torch.randn(2, 12, 5, 5))
    assert out.bases.requires_grad is reaches and out.responsibilities.requires_grad is reaches
    # features - projected removes the residual: what is left is the EM path only
    (out.features - out.projected).pow(2).sum().backward()
    grad = em.proj_in.weight.grad
    got = grad is not None and bool(grad.abs().sum() > 0)
    assert got is reaches
    assert em.proj_out[0].weight.grad is not None  # the reconstruction conv always learns


def test_grad_mode_last_keeps_no_graph_of_earlier_iterations():
    torch.manual_seed(1)
    em = make("last").eval()
    em_full = make("full").eval()
    em_full.load_state_dict(em.state_dict())
    x = torch.randn(1, 16, 30)
    weights = torch.randn(1, 30, 6)

    def loss_of(z):
        return (z * weights).sum()

    xa = x.clone().requires_grad_(True)
    z, _ = em.run_em(xa)
    loss_of(z).backward()
    # reference: two iterations on detached data, one step with gradient from detached bases
    xr = x.clone().requires_grad_(True)
    mu = em.bases.clone()
    with torch.no_grad():
        for _ in range(2):
            mu = m_step(x, e_step(x, mu, 1.0))
    loss_of(e_step(xr, mu.detach(), 1.0)).backward()
    assert torch.allclose(xa.grad, xr.grad, atol=1e-6)
    # unrolling all iterations gives a different gradient
    xf = x.clone().requires_grad_(True)
    zf, _ = em_full.run_em(xf)
    assert torch.allclose(zf, z, atol=1e-6)
    loss_of(zf).backward()
    assert not torch.allclose(xf.grad, xa.grad, atol=1e-6)


def test_invalid_grad_mode_is_refused():
    with pytest.raises(ValueError, match="grad_mode"):
        make("sometimes")


def test_em_runs_in_float32_under_autocast():
    em = make().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = em(torch.randn(1, 12, 4, 4))
    assert out.responsibilities.dtype == torch.float32
    assert torch.allclose(out.responsibilities.sum(1), torch.ones(1, 4, 4), atol=1e-5)
