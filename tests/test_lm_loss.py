"""`moelab.nn.lm_loss.chunked_cross_entropy` against `F.cross_entropy` over the whole logits
(autograd's forward and backward), its memory (no [N, V] tensor ever made), and the model and
trainer paths that use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from moelab.models import ModelConfig, MoETransformer
from moelab.nn.lm_loss import chunk_rows, chunked_cross_entropy
from moelab.train import TrainConfig
from moelab.train.trainer import train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)


def _loss_and_grads(loss_fn, hidden, weight, targets, scale=1.0):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    grad_hidden, grad_weight = torch.autograd.grad(loss * scale, (hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


def _case(n, d, v, dtype, ignored_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = torch.randn(v, d, generator=g).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignored_every:
        targets[::ignored_every] = -100
    return hidden, weight, targets


# both take the logits to float32 for the softmax (a float64 model's too, as the model's loss does)
GRAD_RTOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_equals_cross_entropy_over_the_whole_logits(dtype, rows):
    """Loss and both gradients (times an incoming gradient of 3), chunks that do not divide N,
    one row a chunk and one chunk for all, every 5th target ignored."""
    hidden, weight, targets = _case(150, 12, 37, dtype, ignored_every=5)
    want = _loss_and_grads(_reference, hidden, weight, targets, scale=3.0)
    got = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, rows=rows), hidden, weight, targets, 3.0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == w.dtype == dtype
        # bf16: each chunk's weight gradient is rounded to bf16 before the float32 sum
        rtol = GRAD_RTOL[dtype]
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(1, 30), rows=st.integers(1, 50), ignored=st.integers(0, 3),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_property_any_shape_chunk_and_ignored_targets(n, v, rows, ignored, seed):
    hidden, weight, targets = _case(n, 5, v, torch.float64, seed=seed)
    targets[torch.arange(n) % 4 < ignored] = -100
    if (targets == -100).all():
        targets[0] = 0
    want = _loss_and_grads(_reference, hidden, weight, targets)
    got = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, rows=rows), hidden, weight, targets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * w.abs().max().item())


def test_every_target_ignored_gives_torchs_nan_loss_and_zero_gradients():
    hidden, weight, _ = _case(10, 4, 6, torch.float32)
    targets = torch.full((10,), -100)
    want = _loss_and_grads(_reference, hidden, weight, targets)
    got = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, rows=3), hidden, weight, targets)
    assert want[0].isnan() and got[0].isnan()
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g, w) and not g.any()


def test_under_bf16_autocast_as_the_whole_logits_are():
    hidden, weight, targets = _case(64, 16, 40, torch.float32, ignored_every=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(_reference, hidden, weight, targets)
        got = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, rows=16), hidden, weight, targets)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


class _Products(TorchDispatchMode):
    """Counts the matrix products operations make."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_without_gradients_only_the_loss_is_computed(grad_mode, requires_grad):
    """One product a chunk, not three: under no_grad autograd still says inputs that require
    gradients need them, and the gradients of hidden and weight were made and dropped (an eval
    loss of a trainable model at three times the work, with an fp32 [V, D] held meanwhile)."""
    hidden, weight, targets = _case(20, 4, 9, torch.float64)
    hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad)
    with grad_mode(), _Products() as products:
        got = chunked_cross_entropy(hidden, weight, targets, rows=6)
    assert products.count == 4 and not got.requires_grad
    torch.testing.assert_close(got, _reference(hidden, weight, targets).detach(), rtol=1e-6, atol=0)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operation returns (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_operation_makes_more_than_one_chunk_of_logits():
    """Forward and backward never hold an [N, V] tensor: the largest made is one chunk's logits
    (the whole-logits loss, watched the same way, makes [N, V])."""
    n, d, v, rows = 96, 8, 50, 16
    hidden, weight, targets = _case(n, d, v, torch.float32, ignored_every=4)
    for loss_fn, largest in ((lambda h, w, t: chunked_cross_entropy(h, w, t, rows=rows), rows * v), (_reference, n * v)):
        with _LargestOutput() as watched:
            _loss_and_grads(loss_fn, hidden, weight, targets)
        assert watched.largest == largest


def test_chunk_rows_hold_the_byte_budget_with_a_floor():
    assert chunk_rows(8192) == 1024  # 32 MB of float32 logits
    assert chunk_rows(151_936) == 128  # the floor: fewer rows would slow the GEMM
    assert chunk_rows(10) == 32 * 2**20 // 40


@pytest.mark.parametrize("targets, message", [
    (torch.tensor([0, 9]), "target 9 is outside the vocabulary"),
    (torch.tensor([0, -1]), "target -1 is outside the vocabulary"),
])  # fmt: skip
def test_targets_outside_the_vocabulary_are_refused(targets, message):
    hidden, weight, _ = _case(2, 4, 9, torch.float32)
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(hidden, weight, targets)


def test_mismatched_shapes_are_refused():
    hidden, weight, targets = _case(4, 4, 9, torch.float32)
    with pytest.raises(ValueError, match=r"hidden \[N, D\] and weight \[V, D\]"):
        chunked_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match=r"targets must be \[N\] = \[4\]"):
        chunked_cross_entropy(hidden, weight, targets[:3])


MODEL = {"vocab_size": 300, "dim": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 16,
         "moe": {"num_experts": 4, "hidden_dim": 16, "top_k": 2}}  # fmt: skip


@pytest.mark.parametrize("tie", [True, False])
def test_model_without_logits_gives_the_same_loss_and_gradients(tie):
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.from_dict({**MODEL, "tie_embeddings": tie})).double()
    ids = torch.randint(0, 300, (3, 16))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, targets, return_logits=return_logits)
        (out.loss + out.aux_loss).backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (chunked, chunked_grads) = results
    assert full.logits is not None and chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked.aux_loss, full.aux_loss)
    for got, want in zip(chunked_grads, full_grads, strict=True):  # float32 softmax in both: its rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_model_without_logits_needs_targets():
    model = MoETransformer(ModelConfig.from_dict(MODEL))
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(torch.zeros(1, 4, dtype=torch.long), return_logits=False)


def test_train_step_takes_the_chunked_loss_unless_the_run_file_says_not(monkeypatch):
    """`TrainConfig.chunked_loss` decides the path (the default: chunked); both give one step's
    loss and update."""
    import moelab.models.transformer as transformer

    calls = []
    real = transformer.chunked_cross_entropy
    monkeypatch.setattr(transformer, "chunked_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    after = {}
    for chunked in (True, False):
        torch.manual_seed(0)
        model = MoETransformer(ModelConfig.from_dict(MODEL)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = TrainConfig(steps=1) if chunked else TrainConfig(steps=1, chunked_loss=False)
        stats = train_step(model, optimizer, iter([(ids[:, :-1], ids[:, 1:])]), cfg, torch.device("cpu"),
                           torch.autocast("cpu", enabled=False))  # fmt: skip
        after[chunked] = (stats["scalars"]["loss"], torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert len(calls) == 1  # made by the first step; the second (whole logits) adds none
    assert after[True][0] == pytest.approx(after[False][0], rel=1e-6)
    torch.testing.assert_close(after[True][1], after[False][1], rtol=1e-7, atol=1e-10)


def test_a_second_derivative_is_refused():
    """The backward scales gradients made in the forward, which no graph connects to hidden or
    weight: differentiating it again gave a silently partial answer (a gradient penalty on a scaled
    loss reached the scale, never hidden); it is refused, as torch refuses a once-differentiable
    function."""
    hidden, weight, targets = _case(12, 4, 9, torch.float64)
    hidden.requires_grad_(), weight.requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = chunked_cross_entropy(hidden, weight, targets, rows=5) * scale
    (grad_hidden,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_hidden.square().sum().backward()


def test_an_ignored_row_with_an_infinite_logit_leaves_the_loss_finite_as_torchs():
    hidden, weight, targets = _case(6, 4, 9, torch.float32)
    hidden[2, 0], targets[2] = float("inf"), -100
    want = _reference(hidden, weight, targets)
    got = chunked_cross_entropy(hidden, weight, targets, rows=4)
    assert want.isfinite() and got.isfinite()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
