"""Matrix functions without a second derivative refuse to differentiate twice instead of giving a wrong one."""
import pytest
import torch
from torch.autograd import gradgradcheck

from finegrained.ops import eig_log, eig_power, isqrt_cov, sqrtm_newton_schulz_lyapunov, sqrtm_pade


def _spd(b=2, d=4):
    x = torch.randn(b, d, 3 * d, dtype=torch.float64)
    return (x @ x.transpose(1, 2) / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)).requires_grad_(True)


@pytest.mark.parametrize("name, fn, make", [
    ("isqrt", lambda t: isqrt_cov(t, 3), lambda: torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)),
    ("eig_power", lambda s: eig_power(s, 0.5), _spd),
    ("eig_log", lambda s: eig_log(s, 1e-3), _spd),
    ("lyapunov", lambda s: sqrtm_newton_schulz_lyapunov(s, 5, 5), _spd),
    ("mpa_lya", lambda s: sqrtm_pade(s, "mpa"), _spd),
])
def test_double_backward_is_refused_not_wrong(name, fn, make):
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gradgradcheck(fn, (make(),))
