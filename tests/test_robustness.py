"""Issue 15: matrix heads that never crash, errors in one line, datasets at every root level."""
import logging

import pytest
import scipy.linalg
import torch

from finegrained.heads import build_head

EIG_HEADS = ("mpncov", "o2p", "g2de")


def _cases():
    g = torch.Generator().manual_seed(0)
    live = torch.zeros(4, 32, 7, 7)
    live[:, 3] = torch.rand(4, 7, 7, generator=g)
    repeated = torch.tensor(scipy.linalg.hadamard(32)[:, :16], dtype=torch.float32).T.reshape(1, 16, 32)
    return {
        "constant map": torch.ones(4, 32, 7, 7),
        "scaled 1e-12": torch.rand(4, 32, 7, 7, generator=g) * 1e-12,
        "scaled 1e12": torch.rand(4, 32, 7, 7, generator=g) * 1e12,
        "one live channel": live,
        "repeated eigenvalues": torch.cat([repeated, repeated]).repeat(1, 2, 1).reshape(2, 32, 4, 8),
        "M < C": torch.rand(4, 32, 2, 3, generator=g),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("name", EIG_HEADS)
def test_eigendecomposition_heads_train_on_anything(name, case):
    """Training mode, default head arguments (mpncov's BN reduction included): finite values and gradients."""
    head = build_head(name, 32).train()
    x = _cases()[case].clone().requires_grad_(True)
    out = head(x)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(out).all(), (name, case)
    assert torch.isfinite(x.grad).all(), (name, case)
    for p in head.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), (name, case)


def test_the_issues_example_no_longer_raises():
    build_head("mpncov", in_channels=32).train()(torch.ones(4, 32, 7, 7)).sum()


def test_eigh_result_does_not_depend_on_the_scale():
    from finegrained.ops import eig_power

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 8, 20, generator=g, dtype=torch.float64)
    sigma = x @ x.transpose(1, 2) / 20
    for scale in (1e-30, 1e30):
        torch.testing.assert_close(eig_power(sigma * scale, 0.5) / scale ** 0.5, eig_power(sigma, 0.5))


@pytest.mark.parametrize("failures", [1, 2])
def test_a_failed_eigh_is_retried_and_logged_once(monkeypatch, caplog, failures):
    """The first ``failures`` attempts of every call fail: float32 (then float64) and the ridge take over."""
    from finegrained.ops import eig as eig_module

    real = torch.linalg.eigh
    calls = []

    def flaky(matrix):
        calls.append(matrix.dtype)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    monkeypatch.setattr(eig_module, "_reported", set())
    caplog.set_level(logging.WARNING)
    x = torch.rand(2, 6, 10, generator=torch.Generator().manual_seed(0))
    sigma = x @ x.transpose(1, 2) / 10
    for _ in range(3):
        lam, u = eig_module.symmetric_eigh(sigma)
        calls.clear()
    reference = real(sigma.double())[0].float()
    torch.testing.assert_close(lam, reference, rtol=1e-4, atol=1e-5)
    assert torch.allclose(u @ torch.diag_embed(lam) @ u.transpose(1, 2), sigma, atol=1e-4)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retrying in float64" in m for m in messages) == 1
    assert sum("ridge" in m for m in messages) == failures - 1
