"""``torch.compile`` gives the eager values and gradients: ``dwt2`` / ``idwt2`` and ``FreeKDLoss``
(its hand-written autograd functions included). ``aot_eager`` (tracing and the autograd graph,
no code generation) runs by default; ``inductor`` (generated kernels, ~30 s on a CPU) is slow."""

from __future__ import annotations

import pytest
import torch

from freekd import FreeKDLoss, dwt2, idwt2
from tests.conftest import pyramid, randomize_prompts

BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _bands_energy(x: torch.Tensor, levels: int, wavelet: str) -> torch.Tensor:
    """A scalar of every band and of the reconstruction (so both transforms are in the graph)."""
    low, highs = dwt2(x, levels, wavelet)
    weights = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    total = (low * weights).square().sum() + sum(h.abs().sum() for h in highs)
    return total + idwt2((low, highs), wavelet, size=x.shape[-2:]).sin().sum()


def _value_and_grad(fn, *inputs):
    value = fn(*inputs)
    grads = torch.autograd.grad(value, inputs)
    return value.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_compiled_dwt2_equals_eager(backend, wavelet, device, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 15, 10, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(_bands_energy, backend=backend)
    eager_value, (eager_grad,) = _value_and_grad(lambda t: _bands_energy(t, 3, wavelet), x)
    value, (grad,) = _value_and_grad(lambda t: compiled(t, 3, wavelet), x)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(value, eager_value, **tolerance)
    torch.testing.assert_close(grad, eager_grad, **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["paper", pytest.param("official", marks=pytest.mark.slow)])
def test_compiled_freekd_loss_equals_eager(backend, preset, device):
    loss = FreeKDLoss.preset(preset, [6, 6, 6]).double().to(device)
    randomize_prompts(loss)
    teacher = [t.to(device) for t in pyramid(seed=0)]
    student = [s.to(device).detach().requires_grad_() for s in pyramid(seed=1)]
    eager_value, eager_grads = _value_and_grad(lambda *s: loss(list(s), teacher), *student)
    compiled = torch.compile(loss, backend=backend)
    value, grads = _value_and_grad(lambda *s: compiled(list(s), teacher), *student)
    torch.testing.assert_close(value, eager_value)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad)
    assert set(loss.last_terms) == {"layer0", "layer1", "layer2"}
