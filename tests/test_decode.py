"""The decode path: `gathered_mlp` (a few tokens' experts on gathered weights), `MoELayer.infer`
and `MoETransformer.decode_step`, against the naive float64 reference (tests/reference.py) and
against the training path, forward and backward, every router and setting, and the edge cases
(empty slots, k = E, one token, all tokens to one expert, bf16)."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import F64, assert_close, assert_no_near_tie, expert_ffn, f64_leaf, f64_leaves, moe_forward
from test_model import make_model, random_ids
from test_moe_layer import CONFIGS, D, E, I, make_layer, tokens

from moelab.models import KVCache
from moelab.models.config import UoEConfig
from moelab.nn import MLPExperts, MoEConfig, SwiGLUExperts, build_moe
from moelab.nn.grouped import (
    CappedSwiGLU,
    ClampedSwiGLU,
    GateClampedSwiGLU,
    GeluTanhGLU,
    SoftcappedSwiGLU,
    gathered_mlp,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def always_gather(layer):
    layer.gather_rows = layer.gather_bytes = 10**18
    return layer


def never_gather(layer):
    layer.gather_rows, layer.every_expert_work = 0, -1
    return layer


def expert_by_expert(layer):
    never_gather(layer).small_expert_work = -1
    return layer


def one_grouped_mm_call(layer):
    never_gather(layer).small_expert_work = 10**18
    layer.small_expert_count = 0
    return layer


def every_expert(layer):
    never_gather(layer).every_expert_work = 10**18
    layer.every_expert_share, layer.small_expert_count = 0, 10**9  # whatever the experts chosen
    return layer


PATHS = {
    "gathered": always_gather,
    "accumulated": expert_by_expert,
    "grouped_mm": one_grouped_mm_call,
    "every_expert": every_expert,
}


def per_token(experts, x, indices, weights, activation="swiglu"):
    """sum_k w_tk * expert_{i_tk}(x_t), token by token in float64 (reference.expert_ffn)."""
    p = {f"experts.{n}": t.detach().to(F64) for n, t in experts.named_parameters()}
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=F64)
        for e, w in zip(indices[t].tolist(), weights[t].tolist()):
            if e >= 0:
                y = y + w * expert_ffn(x[t].to(F64), e, p, activation)
        rows.append(y)
    return torch.stack(rows)


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("shape", [(2, 3), (1, 1)], ids=["6 tokens", "1 token"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_infer_matches_reference_forward_and_backward(name, path, shape):
    """infer's output and its gradients (x and every parameter it uses) equal the reference's,
    on the gathered path, the accumulated one and through one grouped_mm call (capacity dropping
    falls back to forward); one token takes the one-token path whichever is set."""
    layer, spec = make_layer(**CONFIGS[name])
    PATHS[path](layer)
    x = tokens(*shape)
    leaves, x_ref = f64_leaves(layer), f64_leaf(x)
    ref = moe_forward(x_ref, leaves, spec)
    assert_no_near_tie(ref.routing, ordered=spec.capacity_factor is not None)
    x_l = x.clone().requires_grad_(True)
    y = layer.infer(x_l)
    assert_close(y, ref.y, what="infer output")
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    (y.to(F64) * G).sum().backward()
    (ref.y * G).sum().backward()
    assert_close(x_l.grad, x_ref.grad, what="grad x")
    for n, param in layer.named_parameters():
        expected = leaves[n].grad if leaves[n].grad is not None else torch.zeros_like(leaves[n])
        actual = param.grad if param.grad is not None else torch.zeros_like(param)
        assert_close(actual, expected, what=f"grad {n}")


def with_output_bias(layer, seed=11):
    """`layer`'s modules (shared, not copied) in a layer with an output bias [D] at unit scale
    (JetMoE's block bias), and the bias."""
    from moelab.nn import MoELayer

    bias = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    biased = MoELayer(
        layer.router, layer.experts, layer.shared, capacity_factor=layer.capacity_factor, latent=layer.latent,
        expert_norm=layer.expert_norm, routed_norm=layer.routed_norm, output_bias=bias,
    )  # fmt: skip
    for name in ("gather_rows", "gather_bytes", "small_expert_work", "small_expert_count", "every_expert_work",
                 "every_expert_share"):  # fmt: skip
        setattr(biased, name, getattr(layer, name))
    return biased, biased.output_bias


@pytest.mark.parametrize("shape", [(2, 3), (1, 1)], ids=["6 tokens", "1 token"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ["topk", "topk-k1", "topk-shared-gated", "topk-mlp-gelu", "topp", "cap-topk"])
def test_output_bias_is_added_once_on_every_path_forward_and_backward(name, path, shape):
    """A layer with an output bias gives the plain layer's output plus the bias, through `forward`
    and through `infer` on each of its paths (gathered, expert by expert, one grouped_mm call, every
    expert; one token; capacity dropping falls back to forward); the gradients of x and of every
    other parameter are the plain layer's, the bias's the sum of the output's gradient over tokens."""
    plain, _ = make_layer(**CONFIGS[name])
    PATHS[path](plain)
    layer, bias = with_output_bias(plain)
    x = tokens(*shape)
    G = torch.randn(*shape, D, generator=torch.Generator().manual_seed(5))
    for run in ("forward", "infer"):
        outputs = {}
        for which in (plain, layer):
            which.zero_grad(set_to_none=True)
            x_l = x.clone().requires_grad_(True)
            y = which(x_l)[0] if run == "forward" else which.infer(x_l)
            (y * G).sum().backward()
            grads = {n: p.grad.clone() for n, p in which.named_parameters() if p.grad is not None}
            outputs[which is layer] = y.detach(), x_l.grad, grads
        (y_plain, gx_plain, g_plain), (y_bias, gx_bias, g_bias) = outputs[False], outputs[True]
        assert_close(y_bias, y_plain + bias.detach(), what=f"{run} output")
        assert_close(gx_bias, gx_plain, what=f"{run} grad x")
        assert_close(g_bias.pop("output_bias"), G.reshape(-1, D).sum(0), what=f"{run} grad output_bias")
        assert g_bias.keys() == g_plain.keys()
        for n in g_plain:
            assert_close(g_bias[n], g_plain[n], what=f"{run} grad {n}")


def test_output_bias_must_be_as_wide_as_the_layer():
    layer, _ = make_layer(**CONFIGS["topk"])
    with pytest.raises(ValueError, match=rf"output_bias has shape \[{D + 1}\].*give \[{D}\]"):
        from moelab.nn import MoELayer

        MoELayer(layer.router, layer.experts, output_bias=torch.zeros(D + 1))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ["topk", "topk-softmax-groups", "topp", "relu", "topk-shared-gated", "topk-mlp-gelu"])
def test_no_tokens_give_no_rows_on_every_path(name, path):
    """An empty batch ([0, D], [2, 0, D]) gives an empty output of its shape, through `forward` and
    through `infer` on each of its paths (the gathered path's view of 0 rows was ambiguous, as was
    the group-limited router's)."""
    layer, _ = make_layer(**CONFIGS[name])
    PATHS[path](layer)
    for shape in [(0,), (2, 0)]:
        x = tokens(*shape)
        with torch.no_grad():
            assert layer(x)[0].shape == x.shape and layer.infer(x).shape == x.shape


@pytest.mark.parametrize("name", ["topk", "topk-k=E", "topp", "relu", "topk-shared-gated", "topk-mlp-gelu"])
@pytest.mark.parametrize("T", [1, 3, 40])
def test_infer_equals_forward_on_both_sides_of_the_threshold(name, T):
    """gather_rows decides the path (T*K <= E: gathered, else dispatch); all give forward's output."""
    layer, _ = make_layer(**CONFIGS[name])
    x = tokens(T)
    with torch.no_grad():
        expected = layer(x)[0]
        assert_close(layer.infer(x), expected, what="default threshold")
        for path, choose in PATHS.items():
            assert_close(choose(layer).infer(x), expected, what=f"always {path}")


def test_infer_goes_expert_by_expert_where_the_experts_are_large(monkeypatch):
    """Eager on a CPU, `infer` gathers the weights of several tokens' experts only while an expert
    fits gather_bytes; beyond, it runs them where they lie (`accumulated`), with the same output.
    One token always takes the gathered path (which then copies nothing)."""
    layer, _ = make_layer(**CONFIGS["topk"])
    layer.small_expert_work = layer.every_expert_work = -1  # neither one grouped_mm call nor every expert
    one = (2 * I * D + D * I) * 4  # a SwiGLU expert's gate_up [2I, D] and down [D, I] in fp32, no biases
    assert layer.experts.expert_bytes == one
    calls = []
    for path in ("gathered", "accumulated"):
        method = getattr(type(layer.experts), path)
        monkeypatch.setattr(type(layer.experts), path, lambda self, *a, _m=method, _p=path, **k: calls.append(_p) or _m(self, *a, **k))
    with torch.no_grad():
        for T, limit, path in ((2, one, "gathered"), (2, one - 1, "accumulated"), (1, 0, "gathered")):
            x = tokens(T)
            layer.gather_bytes, calls[:] = limit, []
            assert_close(layer.infer(x), layer(x)[0], what=f"{T} tokens, {path}")
            assert calls == [path], f"{T} tokens, gather_bytes={limit}: expected the {path} path, ran {calls}"


def test_compiled_infer_gathers_up_to_its_own_limit_and_else_calls_the_opaque_op(monkeypatch):
    """Compiled on a CPU (is_compiling patched here; the compiled step itself is tested in
    test_compile.py), several tokens' experts are gathered while an expert fits
    compiled_gather_bytes, whatever gather_bytes says; beyond, `infer` calls the opaque op
    `moelab::routed_experts`, which runs the layer's `routed`. Same output either way."""
    from moelab.nn import MoELayer, moe

    layer, _ = make_layer(**CONFIGS["topk"])
    one = layer.experts.expert_bytes
    calls = []
    for name, owner in (("gathered", type(layer.experts)), ("routed", MoELayer), ("routed_experts", moe)):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    # dynamo maps torch's functions to its rules once, when it is first imported (the opaque op's
    # call below imports it): made while is_compiling is patched, that map would name the lambda,
    # and every later compile in the process would refuse the real is_compiling
    torch._dynamo.trace_rules.get_torch_obj_rule_map()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer.gather_bytes = 0
    x = tokens(2)
    with torch.no_grad():
        for limit, want in ((one, ["gathered"]), (one - 1, ["routed_experts", "routed"])):
            layer.compiled_gather_bytes, calls[:] = limit, []
            assert_close(layer.infer(x), layer(x)[0], what=f"compiled_gather_bytes={limit}")
            assert calls == want, (limit, calls)


def test_the_opaque_op_passes_torch_library_checks_and_names_a_missing_layer():
    """`torch.library.opcheck`: schema, fake (meta) implementation, dispatch under AOT; the op finds
    copies of a layer (deepcopy registers them) and refuses an id no layer has."""
    import copy
    import gc

    layer, _ = make_layer(**CONFIGS["topk"])
    x = tokens(6)
    with torch.no_grad():
        routing = layer.router(x)
        want = layer.routed(x, routing.indices, routing.weights)
        torch.library.opcheck(torch.ops.moelab.routed_experts.default, (x, routing.indices, routing.weights, id(layer)))
        twin = copy.deepcopy(layer)
        twin.experts.gate_up_proj.mul_(2.0)
        doubled = torch.ops.moelab.routed_experts(x, routing.indices, routing.weights, id(twin))
        assert_close(doubled, twin.routed(x, routing.indices, routing.weights), what="the copy's own experts")
        assert not torch.allclose(doubled, want)
        gone = id(twin)
        del twin
        gc.collect()
        with pytest.raises(RuntimeError, match="no longer exists"):
            torch.ops.moelab.routed_experts(x, routing.indices, routing.weights, gone)


def test_infer_runs_every_expert_on_few_tokens_up_to_its_extra_work(monkeypatch):
    """Past the gathered path, `routed` on a CPU runs every expert on every token where the extra
    products, (E*T - T*K) experts' weights in multiply-adds, are at most every_expert_work and the
    tokens chose at least every_expert_share of the experts but fewer than small_expert_count; else
    it plans the dispatch. The same output either way; never for experts that scale their input."""
    layer, _ = make_layer(**CONFIGS["topk"])
    never_gather(layer)
    calls = []
    real = type(layer.experts).every_expert
    monkeypatch.setattr(type(layer.experts), "every_expert", lambda s, *a: calls.append(1) or real(s, *a))
    T = 3
    extra = (layer.num_experts * T - T * layer.router.top_k) * layer.experts.expert_bytes // 4
    x = tokens(T)
    active = layer.router(x).indices.unique().numel()
    share = active / layer.num_experts
    cases = [(extra, share, active + 1, True), (extra - 1, share, active + 1, False)]
    cases += [(extra, share + 1e-3, active + 1, False), (extra, share, active, False)]
    cases += [(extra, 0, active, False)]  # as many chosen as small_expert_count: the grouped call's
    with torch.no_grad():
        for limit, least, most, runs in cases:
            layer.every_expert_work, layer.every_expert_share, layer.small_expert_count = limit, least, most
            calls[:] = []
            assert_close(layer.infer(x), layer(x)[0], what=f"work {limit}, share {least}, {most}")
            assert bool(calls) == runs, (limit, least, most)
        layer.experts.scale_input, calls[:] = True, []
        layer.every_expert_work = 10**18
        assert_close(layer.infer(x), layer(x)[0], what="scale_input")
        assert not calls


def test_infer_runs_small_experts_as_one_grouped_mm_call(monkeypatch):
    """Beyond the gathered path, a CPU's `infer` runs the experts through the dispatch and one
    torch._grouped_mm call per projection while an expert's work (rows x weights) is at most
    small_expert_work and at least 16 experts have rows, else expert by expert; widths
    torch._grouped_mm cannot take (not 16-byte aligned) stay expert by expert whatever the work,
    and so do 8 experts. Same output every way."""

    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append("grouped_mm") or real(*a, **k))
    accumulated = SwiGLUExperts.accumulated
    monkeypatch.setattr(SwiGLUExperts, "accumulated", lambda self, *a, **k: calls.append("accumulated") or accumulated(self, *a, **k))
    for dim, want_small in ((16, "grouped_mm"), (6, "accumulated")):
        torch.manual_seed(0)
        layer = never_gather(build_moe(MoEConfig(dim=dim, num_experts=32, hidden_dim=I, top_k=4)))
        x = torch.randn(40, dim)
        work = 40 * 4 / 32 * (3 * dim * I)  # rows per expert x weights per expert
        with torch.no_grad():
            expected = layer(x)[0]
            for limit, want in ((work, want_small), (work - 1, "accumulated")):
                layer.small_expert_work, calls[:] = limit, []
                assert_close(layer.infer(x), expected, what=f"dim {dim}, limit {limit}")
                assert calls[-1] == want and set(calls) == {want}, (dim, limit, calls)
    eight = never_gather(build_moe(MoEConfig(dim=16, num_experts=8, hidden_dim=I, top_k=2)))
    calls[:] = []
    with torch.no_grad():
        eight.infer(torch.randn(40, 16))
    assert set(calls) == {"accumulated"}


def test_infer_with_dynamic_skipping_latent_experts_and_a_chain():
    from moelab.nn import MoEConfig, build_moe

    for fields in (dict(latent_dim=8), dict(chain_iterations=3, num_shared=1), dict(top_k=3)):
        torch.manual_seed(0)
        module = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=8, **fields))
        layer = getattr(module, "layer", module)
        layer.skip_ratio = 0.5 if fields.get("top_k") == 3 else None
        x = tokens(5)
        for path, choose in PATHS.items():
            choose(layer)
            with torch.no_grad():
                assert_close(module.infer(x), module(x)[0], what=f"{fields} {path}")


def test_infer_routes_whole_sequences_for_graph_routers():
    from moelab.nn import MoEConfig, build_moe

    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=8, router="graph_sim"))
    x = tokens(2, 3)
    for choose in PATHS.values():
        with torch.no_grad():
            assert_close(choose(layer).infer(x), layer(x)[0])


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.zeros(3, D + 1), torch.zeros(3, D, dtype=torch.long)])
def test_infer_rejects_bad_inputs_like_forward(bad):
    layer, _ = make_layer()
    with pytest.raises(ValueError, match="MoE layer expects"):
        layer.infer(bad)


def test_all_tokens_to_one_expert_and_tokens_with_no_expert():
    layer, _ = make_layer(top_k=1, router_bias=True)
    with torch.no_grad():
        layer.router.bias.zero_()
        layer.router.bias[2] = 30.0
        x = tokens(4)
        assert_close(always_gather(layer).infer(x), layer(x)[0])
        assert_close(never_gather(layer).infer(x), layer(x)[0])
    experts = SwiGLUExperts(E, D, 8)
    x = tokens(3)
    indices = torch.tensor([[-1, -1], [4, -1], [-1, 0]])
    weights = torch.tensor([[0.3, 0.2], [0.7, 0.5], [0.4, 1.3]])  # empty slots' weights are ignored
    got = experts.gathered(x, indices, weights)
    assert torch.all(got[0] == 0), "a token with no expert gets exactly zero"
    assert_close(got, per_token(experts, x, indices, weights))
    assert_close(experts.every_expert(x, indices, weights), got, what="every expert")
    for t in range(3):  # one token at a time: the eager CPU path without gathered copies
        one = experts.gathered(x[t : t + 1], indices[t : t + 1], weights[t : t + 1])
        assert_close(one, got[t : t + 1], what=f"token {t} alone")


@pytest.mark.parametrize(
    "kind",
    ["swiglu-bias", "clamped", "capped", "gelu_tanh_glu", "gate_clamped", "softcapped", "scale_input", "gelu-bias",
     "relu", "relu2"],
)
def test_gathered_experts_match_per_token_loops(kind):
    torch.manual_seed(0)
    if kind in ("gelu-bias", "relu", "relu2"):
        experts = MLPExperts(E, D, 8, activation=kind.split("-")[0], bias=kind.endswith("bias"))
    else:
        two_input = {
            "clamped": ClampedSwiGLU(limit=0.5),
            "capped": CappedSwiGLU(0.5),
            "gelu_tanh_glu": GeluTanhGLU(),
            "gate_clamped": GateClampedSwiGLU(0.5),
            "softcapped": SoftcappedSwiGLU(0.5, 0.75),
        }
        experts = SwiGLUExperts(
            E,
            D,
            8,
            bias=kind != "scale_input",
            clamped=two_input.get(kind),
            scale_input=kind == "scale_input",
        )
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    x = tokens(4)
    indices = torch.tensor([[0, 3], [3, -1], [7, 0], [5, 5]])
    weights = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.2, 0.9], [0.5, 0.25]])
    got = experts.gathered(x, indices, weights)
    # The grouped path on the same assignments is the reference: rows sorted by expert.
    flat = indices.reshape(-1)
    keep = (flat >= 0).nonzero().flatten()
    order = keep[torch.argsort(flat[keep], stable=True)]
    counts = torch.bincount(flat[order], minlength=E).tolist()
    ys = experts(x.repeat_interleave(2, 0)[order], counts, weights.reshape(-1)[order])
    expected = torch.zeros(4, D).index_add_(0, order // 2, ys)
    assert_close(got, expected, what=kind)
    accumulated = experts.accumulated(x, order // 2, counts, weights.reshape(-1)[order])
    assert_close(accumulated, expected, what=f"{kind} accumulated")
    if experts.runs_every_expert:
        assert_close(experts.every_expert(x, indices, weights), expected, what=f"{kind} every expert")
    else:
        with pytest.raises(NotImplementedError):
            experts.every_expert(x, indices, weights)
    if kind in ("swiglu-bias", "gelu-bias", "relu", "relu2"):
        activation = "swiglu" if kind.startswith("swiglu") else kind.split("-")[0]
        assert_close(got, per_token(experts, x, indices, weights, activation), what=f"{kind} vs float64")


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 5),
    E_=st.integers(1, 6),
    data=st.data(),
    bf16=st.booleans(),
)
def test_gathered_mlp_property(T, E_, data, bf16):
    """Any T, E, K <= E, any pattern of empty slots, fp32 and bf16: gathered_mlp and
    every_expert_mlp equal the float64 per-token sum (bf16 to its precision)."""
    K = data.draw(st.integers(1, E_))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    indices = torch.stack([torch.randperm(E_, generator=g)[:K] for _ in range(T)])
    empty = torch.rand(T, K, generator=g) < 0.3
    indices = indices.masked_fill(empty, -1)
    weights = torch.rand(T, K, generator=g).masked_fill(empty, 0.0)
    experts = SwiGLUExperts(E_, D, 4)
    dtype = torch.bfloat16 if bf16 else torch.float32
    experts.to(dtype)
    x = torch.randn(T, D, generator=g).to(dtype)
    tol = 3e-2 if bf16 else 1e-5
    for run in (experts.gathered, experts.every_expert):
        with torch.no_grad():
            got = run(x, indices, weights)
        assert got.dtype == dtype and got.shape == (T, D)
        assert_close(got, per_token(experts, x, indices, weights), atol=tol, rtol=tol, what=run.__name__)


def test_gathered_mlp_casts_weights_stored_in_another_dtype():
    experts = SwiGLUExperts(E, D, 8).to(torch.bfloat16)
    x = tokens(2)
    indices, weights = torch.tensor([[1, 2], [3, 1]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    got = gathered_mlp(
        x,
        indices,
        weights,
        experts.gate_up_proj,
        None,
        experts.down_proj,
        None,
        activation="silu",
        gated=True,
    )
    assert got.dtype == torch.float32
    assert_close(got, per_token(experts, x, indices, weights), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the model


ROUTERS = {
    "topk": dict(),
    "topp": dict(router="topp", top_p=0.5),
    "relu": dict(router="relu", activation="silu"),
    "chain": dict(chain_iterations=2),
    "shared": dict(num_shared=1, shared_gate=True),
}


@pytest.mark.parametrize("kind", list(ROUTERS))
def test_decode_step_equals_forward_with_and_without_cache(kind):
    model = make_model(moe_fields=ROUTERS[kind], init_std=0.2).eval()
    ids = random_ids(batch=3, seq=9)
    cache = KVCache(model.config, batch_size=3, max_len=9)
    with torch.no_grad():
        full = model(ids).logits
        assert_close(model.decode_step(ids), full[:, -1], what="no cache")
        prefill = model.decode_step(ids[:, :6], cache, 0)
        steps = [model.decode_step(ids[:, t : t + 1], cache, t) for t in range(6, 9)]
    assert_close(prefill, full[:, 5], what="prefill")
    for t, logits in zip(range(6, 9), steps):
        assert_close(logits, full[:, t], what=f"step {t}")


@pytest.mark.parametrize("kind", list(ROUTERS))
def test_static_decode_step_equals_the_dynamic_one(kind):
    """The step `generate(compile=True)` compiles: the position a 0-d tensor, the whole (longer)
    cache attended under a mask; it must give the dynamic step's logits at every position."""
    model = make_model(moe_fields=ROUTERS[kind], init_std=0.2).eval()
    ids = random_ids(batch=2, seq=10)
    dynamic = KVCache(model.config, batch_size=2, max_len=10)
    static = KVCache(model.config, batch_size=2, max_len=16)  # positions 10..15 never written, masked
    with torch.no_grad():
        assert_close(model._decode(ids[:, :6], static, 0), model._decode(ids[:, :6], dynamic, 0), what="prefill")
        for t in range(6, 10):
            want = model._decode(ids[:, t : t + 1], dynamic, t)
            assert_close(model._decode(ids[:, t : t + 1], static, torch.tensor(t)), want, what=f"step {t}")


def test_only_dropless_single_rank_layers_compile_their_infer():
    moe = next(iter(make_model().eval().moe_layers.values()))
    assert moe.compiles_infer
    moe.capacity_factor = 1.0
    assert not moe.compiles_infer, "capacity dropping runs forward, which reads the routing on the host"


def test_decode_step_of_sequence_routing_models_and_uoe():
    graph = make_model(moe_fields=dict(router="graph_sim")).eval()
    uoe = make_model(
        moe=None, uoe=UoEConfig(attn_top_k=2, mlp_experts=4, mlp_top_k=2), n_kv_heads=None, first_k_dense=0
    ).eval()
    ids = random_ids(batch=2, seq=7)
    with torch.no_grad():
        for model in (graph, uoe):
            assert_close(model.decode_step(ids), model(ids).logits[:, -1])
    with pytest.raises(ValueError, match="cannot decode from a KV cache"):
        graph.decode_step(ids, KVCache(graph.config, batch_size=2, max_len=7), 0)


@pytest.mark.parametrize("moe_fields", [dict(router="expert_choice"), dict(capacity_factor=0.5)])
def test_kv_cache_is_refused_where_routing_sees_other_tokens(moe_fields):
    model = make_model(moe_fields=moe_fields, allow_noncausal_routing=True).eval()
    ids = random_ids(batch=1, seq=8)
    with torch.no_grad():
        assert_close(model.decode_step(ids), model(ids).logits[:, -1])  # no cache: the full forward
        with pytest.raises(ValueError, match="cannot decode from a KV cache"):
            model.decode_step(ids, KVCache(model.config, batch_size=1, max_len=8), 0)
        with pytest.raises(ValueError, match="cannot decode from a KV cache"):
            model(ids, kv_cache=KVCache(model.config, batch_size=1, max_len=8))


def test_decode_step_checks_its_inputs():
    model = make_model().eval()
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        model.decode_step(torch.zeros(2, 3))
    cache = KVCache(model.config, batch_size=2, max_len=4)
    with pytest.raises(ValueError, match="exceed the KV cache's max_len"):
        model.decode_step(random_ids(seq=2), cache, 3)
    with pytest.raises(ValueError, match="the KV cache holds 2 sequences but input_ids has 3"):
        model.decode_step(random_ids(batch=3, seq=1), cache, 0)
    assert KVCache(model.config, batch_size=1, max_len=model.config.max_seq_len).max_len == model.config.max_seq_len
    for bad in (0, model.config.max_seq_len + 1):
        with pytest.raises(ValueError, match="KVCache max_len must lie in"):
            KVCache(model.config, batch_size=1, max_len=bad)
    noncausal = make_model(moe_fields=dict(router="expert_choice", ec_capacity_factor=1.0))
    with pytest.raises(ValueError, match="route non-causally"):
        noncausal.decode_step(random_ids(seq=2))


def test_decode_step_in_bf16_equals_forward():
    model = make_model(init_std=0.2).eval().to(torch.bfloat16)
    ids = random_ids(batch=2, seq=6)
    with torch.no_grad():
        logits = model.decode_step(ids)
        assert logits.dtype == torch.bfloat16
        assert_close(logits, model(ids).logits[:, -1], atol=2e-2, rtol=2e-2)


def test_on_a_gpu_infer_gathers_while_the_copies_fit_and_so_reads_nothing_back(monkeypatch):
    """On a GPU (asked of the decision alone: no GPU here) the gathered path is taken while the
    T*K experts' copies fit gpu_gather_bytes, whatever gather_rows says; there `infer` reads
    nothing back to the host, which a CUDA graph of the decode step needs. Beyond it, bf16 experts
    on torch._grouped_mm keep the dispatch's counts on the device (read nothing back either), fp32
    ones do not. Experts that read the routing on the host always sync."""
    layer, _ = make_layer(**CONFIGS["topk"])
    cuda, K = torch.device("cuda"), layer.router.top_k
    layer.gather_rows = 0
    layer.gpu_gather_bytes = 3 * K * layer.experts.expert_bytes
    assert layer._gathers_rows(3 * K, cuda) and not layer._gathers_rows(3 * K + 1, cuda)
    assert not layer.compiled_infer_syncs(3, cuda) and layer.compiled_infer_syncs(4, cuda)
    assert layer.compiled_infer_syncs(1, torch.device("cpu")), "gather_rows=0 on a CPU: the dispatch"
    beyond = build_moe(MoEConfig(dim=16, num_experts=E, hidden_dim=8, top_k=2))  # past gpu_gather_bytes: the dispatch
    beyond.gpu_gather_bytes = 0
    assert beyond.compiled_infer_syncs(1, cuda), "fp32 on CUDA: no torch._grouped_mm, counts on the host"
    assert not beyond.to(torch.bfloat16).compiled_infer_syncs(1, cuda), "bf16: the counts stay on the device"
    monkeypatch.setattr(type(layer.experts), "reads_routing_on_host", True)
    assert layer.compiled_infer_syncs(1, cuda) and beyond.compiled_infer_syncs(1, cuda)


class _ReplayByRerunning:
    """A stand-in for a CUDA graph on a CPU: replay runs the captured function again and writes
    its output into the buffer the capture returned, as a replay rewrites the graph's outputs."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.out.copy_(self.fn())
        self.replays += 1


def test_generate_replays_one_decode_graph_where_no_layer_syncs(monkeypatch):
    """generate(compile=True) on a GPU where nothing syncs captures the step once and replays it
    at every later token, copying each token and position into the graph's buffers: the same
    tokens as eager decoding. The next call of the same shapes replays the same graph. Run on a
    CPU with the capture replaced by a rerun of the captured function (what CUDA does is CUDA's;
    the buffers, positions and calls are moelab's)."""
    from moelab.models import decode_graph

    model = make_model(init_std=0.2).eval()
    ids = random_ids(batch=2, seq=5)
    want = model.generate(ids, 6, greedy=True)
    graphs = []

    def fake_capture(fn, device):
        fn()  # the warm-up
        out = fn()
        graphs.append(_ReplayByRerunning(fn, out))
        return graphs[-1], out

    monkeypatch.setattr(decode_graph, "capture", fake_capture)
    steps = [type(model)._decode]  # the static step, uncompiled; a new one when the weights change
    compiled = lambda: SimpleNamespace(step=steps[-1], frozen=True, mark_cache=lambda cache: None)  # noqa: E731
    monkeypatch.setattr(model, "_compiled_step", compiled)
    monkeypatch.setattr(model, "_graphs_decode", lambda batch, device: True)
    assert torch.equal(model.generate(ids, 6, greedy=True, compile=True), want)
    assert len(graphs) == 1 and graphs[0].replays == 5  # the prompt eagerly, then one replay per token

    # The next call of the same shapes (another, shorter prompt: the same 64-position cache) reuses
    # the graph and its cache; the old entries past the new prompt are masked out.
    other = random_ids(batch=2, seq=3, seed=7)
    assert torch.equal(model.generate(other, 9, greedy=True, compile=True), model.generate(other, 9, greedy=True))
    assert len(graphs) == 1 and graphs[0].replays == 5 + 8
    # Other shapes capture anew (and replace the graph held); so does a new step (new weights).
    three = random_ids(batch=3, seq=5, seed=8)
    assert torch.equal(model.generate(three, 4, greedy=True, compile=True), model.generate(three, 4, greedy=True))
    assert torch.equal(model.generate(ids, 6, greedy=True, compile=True), want)
    steps.append(lambda *args: type(model)._decode(*args))
    assert torch.equal(model.generate(ids, 6, greedy=True, compile=True), want)
    model.release_decode_cache()  # the next call captures again
    assert torch.equal(model.generate(ids, 6, greedy=True, compile=True), want)
    assert [g.replays for g in graphs] == [13, 3, 5, 5, 5]


def test_a_failed_capture_warns_and_decodes_uncaptured(monkeypatch):
    """Where capturing fails (e.g. dynamo past its recompile limit runs the step eagerly, and the
    router's check reads back inside the capture), generate warns and decodes without the graph:
    the same tokens."""
    from moelab.models import decode_graph

    model = make_model(init_std=0.2).eval()
    ids = random_ids(batch=2, seq=5)
    want = model.generate(ids, 6, greedy=True)

    def failing_capture(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_graph, "capture", failing_capture)
    fake = SimpleNamespace(step=type(model)._decode, frozen=True, mark_cache=lambda cache: None)
    monkeypatch.setattr(model, "_compiled_step", lambda: fake)
    monkeypatch.setattr(model, "_graphs_decode", lambda batch, device: True)
    with pytest.warns(UserWarning, match="without a CUDA graph.*not permitted"):
        assert torch.equal(model.generate(ids, 6, greedy=True, compile=True), want)
