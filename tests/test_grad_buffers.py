"""Recycled expert-gradient buffers (`moelab.nn.grad_buffers`): a step reuses the memory of a
gradient no one holds any more, never memory someone still sees, and every step's gradients are
the ones autograd gives without the pool (the "loop" backend's, which does not use it)."""

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from moelab.memory import release_freed_memory
from moelab.nn import SwiGLUExperts, grad_buffers

E, D, I = 4, 16, 8
COUNTS = [5, 0, 7, 3]  # expert 1 gets no rows: its gradient slice must still be written (zeros)


@pytest.fixture
def pool_everything(monkeypatch):
    """Pool gradients of any size (the tests' experts are far below MIN_BYTES), starting empty."""
    monkeypatch.setattr(grad_buffers, "MIN_BYTES", 0)
    grad_buffers.release()
    yield
    grad_buffers.release()


def _experts(backend: str) -> SwiGLUExperts:
    torch.manual_seed(0)
    return SwiGLUExperts(E, D, I, backend=backend)


def _step(experts: SwiGLUExperts, seed: int) -> None:
    """One forward+backward of rows drawn from `seed`, gradients added to the parameters'."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(sum(COUNTS), D, generator=g)
    row_weights = torch.rand(sum(COUNTS), generator=g)
    out = experts(xs, COUNTS, row_weights)
    out.backward(torch.randn(out.shape, generator=g))


def _expected(seeds: list[int]) -> dict[str, torch.Tensor]:
    """The gradients the steps of `seeds` sum to, from the loop backend's autograd."""
    reference = _experts("loop")
    for seed in seeds:
        _step(reference, seed)
    return {name: p.grad for name, p in reference.named_parameters()}


def _check(experts: SwiGLUExperts, seeds: list[int]) -> None:
    expected = _expected(seeds)
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_a_step_after_zero_grad_reuses_the_last_step_s_memory_with_its_own_values(pool_everything):
    experts = _experts("grouped")
    _step(experts, 1)
    _check(experts, [1])
    memory = {name: p.grad.data_ptr() for name, p in experts.named_parameters()}
    garbage = {name: p.grad.clone() for name, p in experts.named_parameters()}
    experts.zero_grad(set_to_none=True)
    _step(experts, 2)
    assert {name: p.grad.data_ptr() for name, p in experts.named_parameters()} == memory
    _check(experts, [2])  # not the first step's, nor their sum
    assert all(not torch.equal(p.grad, garbage[name]) for name, p in experts.named_parameters())
    assert torch.all(experts.gate_up_proj.grad[1] == 0) and torch.all(experts.down_proj.grad[1] == 0)
    assert grad_buffers.pooled_bytes() == sum(p.nbytes for p in experts.parameters())


@pytest.mark.parametrize("zero_in_place", [False, True], ids=["accumulate", "zero_grad_set_to_none_false"])
def test_gradients_kept_from_step_to_step_are_never_handed_out_again(pool_everything, zero_in_place):
    """Gradients kept (summed over steps, or zeroed in place by zero_grad(set_to_none=False)) hold
    their memory: each step's gradients go to other memory and autograd adds them to the kept ones
    (that step's buffer is then free for the next: the pool stops growing at two)."""
    experts = _experts("grouped")
    for step in range(1, 4):
        if zero_in_place:
            experts.zero_grad(set_to_none=False)
        _step(experts, step)
        _check(experts, [step] if zero_in_place else list(range(1, step + 1)))
    assert grad_buffers.pooled_bytes() == 2 * sum(p.nbytes for p in experts.parameters())


HOLDS = {  # what a caller keeps of a gradient, and how its values are read back then
    "tensor": (lambda g: g, lambda kept, shape: kept),
    "slice": (lambda g: g[2:], lambda kept, shape: torch.cat([torch.zeros(2, *shape[1:]), kept])),
    "detach": (lambda g: g.detach(), lambda kept, shape: kept),
    "view": (lambda g: g.view(-1), lambda kept, shape: kept.view(shape)),
    "numpy": (lambda g: g.numpy(), lambda kept, shape: torch.from_numpy(np.array(kept))),
    "storage": (lambda g: g.untyped_storage(), lambda kept, shape: torch.empty(0).set_(kept, 0, shape)),
}


@pytest.mark.parametrize("hold", HOLDS)
def test_a_gradient_someone_still_holds_keeps_its_values(pool_everything, hold):
    keep, read = HOLDS[hold]
    experts = _experts("grouped")
    _step(experts, 1)
    first = experts.gate_up_proj.grad.clone()
    kept = keep(experts.gate_up_proj.grad)
    experts.zero_grad(set_to_none=True)
    _step(experts, 2)
    _check(experts, [2])
    if hold == "slice":
        first[:2] = 0
    torch.testing.assert_close(read(kept, first.shape), first)


def test_a_gradient_sent_to_another_process_keeps_its_values_there(pool_everything):
    """torch.multiprocessing sends a CPU tensor by moving its storage to shared memory, which the
    receiver maps: once the sender drops the gradient, its memory is not written again (it leaves
    the pool, which does not grow)."""
    experts = _experts("grouped")
    _step(experts, 1)
    first = experts.gate_up_proj.grad.clone()
    fd, size = experts.gate_up_proj.grad.untyped_storage()._share_fd_cpu_()  # what a Queue.put does
    mapped = torch.UntypedStorage._new_shared_fd_cpu(fd, size)  # what the receiving process maps
    received = torch.empty(0).set_(mapped, 0, first.shape)
    experts.zero_grad(set_to_none=True)
    _step(experts, 2)
    _check(experts, [2])
    torch.testing.assert_close(received, first)
    assert grad_buffers.pooled_bytes() == sum(p.nbytes for p in experts.parameters())


def test_release_frees_what_no_tensor_uses(pool_everything):
    experts = _experts("grouped")
    _step(experts, 1)
    assert grad_buffers.pooled_bytes() > 0
    release_freed_memory()
    assert grad_buffers.pooled_bytes() == 0
    _check(experts, [1])  # the gradients handed out stay as they are
    experts.zero_grad(set_to_none=True)
    _step(experts, 2)
    grad_buffers.release()
    assert grad_buffers.pooled_bytes() == 0


def test_a_weight_s_pool_goes_with_the_weight_and_follows_its_size(pool_everything):
    """The pool is the weight's (weakly keyed): deleting the model frees its gradient memory, and a
    weight whose data was replaced by another size gets a buffer of that size."""
    import gc

    experts = _experts("grouped")
    _step(experts, 1)
    experts.zero_grad(set_to_none=True)
    assert grad_buffers.pooled_bytes() == sum(p.nbytes for p in experts.parameters())
    with torch.no_grad():  # 3 of the 4 experts, as pruning in place would leave them
        experts.gate_up_proj.data = experts.gate_up_proj.data[:3].clone()
        experts.down_proj.data = experts.down_proj.data[:3].clone()
    experts.num_experts = 3
    out = experts(torch.randn(9, D), [4, 0, 5], torch.rand(9))
    out.sum().backward()
    assert experts.gate_up_proj.grad.shape == (3, 2 * I, D) and experts.down_proj.grad.shape == (3, D, I)
    assert grad_buffers.pooled_bytes() == sum(p.nbytes for p in experts.parameters())  # the old size left
    del experts, out
    gc.collect()
    assert grad_buffers.pooled_bytes() == 0


def test_what_is_pooled():
    """Contiguous plain CPU tensors of at least MIN_BYTES, outside torch.compile's tracing; anything
    else is torch.empty_like's (a fake tensor has no storage to count references of)."""
    grad_buffers.release()
    with FakeTensorMode():
        fake = torch.empty(2, grad_buffers.MIN_BYTES // 8)
        assert isinstance(grad_buffers.empty_gradient_like(fake), FakeTensor)
    compiled = torch.compile(lambda w: grad_buffers.empty_gradient_like(w).fill_(1.0), backend="eager")
    assert compiled(torch.empty(2, grad_buffers.MIN_BYTES // 8)).sum() == grad_buffers.MIN_BYTES // 4
    assert grad_buffers.pooled_bytes() == 0
    small = torch.empty(4, 8)
    assert grad_buffers.empty_gradient_like(small).shape == (4, 8) and grad_buffers.pooled_bytes() == 0
    large = torch.empty(2, grad_buffers.MIN_BYTES // 8)  # exactly MIN_BYTES of float32
    transposed = torch.empty(grad_buffers.MIN_BYTES // 8, 2).t()
    buffer = grad_buffers.empty_gradient_like(transposed)
    assert buffer.stride() == transposed.stride() and grad_buffers.pooled_bytes() == 0  # empty_like's layout
    buffer = grad_buffers.empty_gradient_like(large)
    assert buffer.shape == large.shape and buffer.dtype == large.dtype and buffer.is_contiguous()
    assert grad_buffers.pooled_bytes() == grad_buffers.MIN_BYTES
    grad_buffers.release()


def test_a_compiled_step_captures_the_grouped_backward_whole(pool_everything):
    """Traced by torch.compile, the backward takes plain `torch.empty_like` buffers: the
    autograd.Function compiles as one graph (the pool's lock would break it), and the compiled
    step's gradients are autograd's."""
    torch._dynamo.reset()
    experts = _experts("grouped")
    step = torch._dynamo.explain(lambda xs, rw: experts(xs, COUNTS, rw))
    explanation = step(torch.randn(sum(COUNTS), D), torch.rand(sum(COUNTS)))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    _step(torch.compile(experts), 1)
    _check(experts, [1])
    assert grad_buffers.pooled_bytes() == 0
