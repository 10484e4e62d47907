"""HEAPr and the calibration's backward sweep against naive references: the layer-by-layer
gradients equal one autograd pass through the whole model (moelab and transformers checkpoints),
the per-neuron sums equal a token-by-token computation, the scores and the two layouts follow
compression.md §4 on worked examples, and a killed backward sweep resumes to the same files."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_tiny import build
from layer_views import make_view, stats_with
from reference import ACT, F64, gelu_tanh, silu
from test_compress import SMALL, hf_model, moelab_model

from moelab.compress import calibrate, compress
from moelab.compress.calibration import calibration_mixture
from moelab.compress.methods import Target, get_method
from moelab.compress.methods.heapr import narrowed, neuron_scores, uniform_width, zeroed
from moelab.compress.observers import DEFAULT_OBSERVERS
from moelab.compress.stats import LayerStats
from moelab.hf.layerwise import LayerwiseModel
from moelab.hf.loading import load_causal_lm
from moelab.hf.native import experts_from_view
from moelab.models import load_pretrained
from moelab.nn import MLPExperts, SwiGLUExperts
from moelab.nn.grouped import CappedSwiGLU, ClampedSwiGLU, GateClampedSwiGLU, GeluTanhGLU, SoftcappedSwiGLU
from moelab.nn.moe import MoEResult

BACKWARD = dataclasses.replace(SMALL, observers=DEFAULT_OBSERVERS + ("neurons",), dtype="float64")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is faster on the project's 2-core machine."""


# ----------------------------------------------------------------------------- experts split in two


@pytest.mark.parametrize(
    "kind", ["plain", "bias", "clamped", "capped", "gelu_tanh_glu", "gate_clamped", "softcapped", "scale_input"]
)  # the eight ways a checkpoint's experts compute
def test_hidden_then_project_is_the_experts_forward(kind):
    torch.manual_seed(0)
    two_input = {
        "clamped": ClampedSwiGLU(),
        "capped": CappedSwiGLU(0.5),
        "gelu_tanh_glu": GeluTanhGLU(),
        "gate_clamped": GateClampedSwiGLU(0.5),
        "softcapped": SoftcappedSwiGLU(0.5, 0.75),
    }
    experts = SwiGLUExperts(
        4,
        6,
        5,
        bias=kind == "bias",
        clamped=two_input.get(kind),
        scale_input=kind == "scale_input",
    ).double()
    if kind == "bias":
        torch.nn.init.normal_(experts.gate_up_bias)
        torch.nn.init.normal_(experts.down_bias)
    counts = [3, 0, 4, 2]
    xs = torch.randn(9, 6, dtype=F64)
    weights = torch.rand(9, dtype=F64)
    expected = experts(xs, counts, weights if kind == "scale_input" else None)
    got = experts.project(experts.hidden(xs, counts, weights), counts)
    if kind != "scale_input":
        expected = experts(xs, counts)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the hidden activation itself, token by token from the equations
    W = experts.gate_up_proj
    for row, e in enumerate([0, 0, 0, 2, 2, 2, 2, 3, 3]):
        x = xs[row] * (weights[row] if kind == "scale_input" else 1)
        h = W[e] @ x + (experts.gate_up_bias[e] if kind == "bias" else 0)
        gate, up = h[:5], h[5:]
        if kind == "clamped":
            gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
            act = gate * torch.sigmoid(1.702 * gate) * (up + 1)
        elif kind == "capped":
            act = silu(gate).clamp(max=0.5) * up.clamp(-0.5, 0.5)
        elif kind == "gelu_tanh_glu":
            act = gelu_tanh(gate) * up
        elif kind == "gate_clamped":
            act = silu(gate.clamp(max=0.5)) * up.clamp(-0.5, 0.5)
        elif kind == "softcapped":
            act = 0.5 * torch.tanh(gate / 0.5) * torch.sigmoid(gate) * 0.75 * torch.tanh(up / 0.75)
        else:
            act = silu(gate) * up
        torch.testing.assert_close(experts.hidden(xs, counts, weights)[row], act, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu2", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_plain_experts_hidden_then_project_is_their_forward(activation, bias):
    """Plain experts (Nemotron-H's relu², no gate): hidden is act(up x + b) row by row, and
    projecting it is the forward."""
    torch.manual_seed(0)
    experts = MLPExperts(4, 6, 5, activation=activation, bias=bias).double()
    if bias:
        torch.nn.init.normal_(experts.up_bias)
        torch.nn.init.normal_(experts.down_bias)
    counts = [3, 0, 4, 2]
    xs = torch.randn(9, 6, dtype=F64)
    hidden = experts.hidden(xs, counts)
    torch.testing.assert_close(experts.project(hidden, counts), experts(xs, counts), rtol=1e-12, atol=1e-12)
    for row, e in enumerate([0, 0, 0, 2, 2, 2, 2, 3, 3]):
        z = experts.up_proj[e] @ xs[row] + (experts.up_bias[e] if bias else 0)
        torch.testing.assert_close(hidden[row], ACT[activation](z), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the backward sweep


def _naive_moe(records: list, layer: int):
    """A forward for a moelab MoELayer that computes every routed (token, expert) pair on its own,
    keeping each hidden activation h (retain_grad) in `records` as (layer, window, position, e, h)."""

    def forward(moe, x, context=None, window=None):
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        routing = moe.router(flat)
        I = moe.experts.hidden_dim
        W, Wd = moe.experts.gate_up_proj, moe.experts.down_proj
        rows = []
        for t in range(flat.shape[0]):
            y = torch.zeros(D, dtype=flat.dtype)
            for k in range(routing.indices.shape[1]):
                e = int(routing.indices[t, k])
                if e < 0:
                    continue
                h = silu(W[e, :I] @ flat[t]) * (W[e, I:] @ flat[t])
                h.retain_grad()
                records.append((layer, window[0], t, e, h))
                y = y + routing.weights[t, k] * (Wd[e] @ h)
            rows.append(y)
        return torch.stack(rows).view(B, S, D), MoEResult(experts_per_token=torch.zeros(()))

    return forward


@pytest.mark.parametrize("tied", [False, True])  # tied: the output head is the embedding's weight
def test_backward_sweep_equals_one_autograd_pass_token_by_token(tmp_path, tied):
    """HEAPr's sums from the layer-by-layer sweep equal those of the whole moelab model in one
    float64 autograd graph, every (token, expert) computed on its own: sum h^2 and sum (dL/dh)^2,
    L the mean next-token loss over all calibration tokens."""
    model_dir = moelab_model(tmp_path / "m", tie_embeddings=tied)
    stats = calibrate(model_dir, tmp_path / "s", options=BACKWARD, quiet=True)
    mixture = calibration_mixture(model_dir, "corpus", BACKWARD)
    model = load_pretrained(model_dir).double()
    records: list = []
    window = [0]
    moe_layers = [i for i, block in enumerate(model.layers) if hasattr(block.ffn, "router")]
    for i in moe_layers:
        model.layers[i].ffn.forward = (lambda f, m: lambda x, context=None: f(m, x, context, window))(
            _naive_moe(records, i), model.layers[i].ffn
        )
    predicted = sum(w.ids.numel() - 1 for w in mixture.windows)
    loss = 0
    for n, w in enumerate(mixture.windows):
        window[0] = n
        logits = model(w.ids[None]).logits[0]
        loss = loss + torch.nn.functional.cross_entropy(logits[:-1], w.ids[1:], reduction="sum") / predicted
    loss.backward()
    S = len(mixture.sources)
    for i in moe_layers:
        act = torch.zeros(2, S, 8, 32, dtype=F64)
        grad = torch.zeros(2, S, 8, 32, dtype=F64)
        for layer, n, _, e, h in records:
            if layer == i:
                w = mixture.windows[n]
                act[w.half, w.source, e] += h.detach() ** 2
                grad[w.half, w.source, e] += h.grad**2
        got = stats.layer(i)
        assert float(grad.sum()) > 0
        torch.testing.assert_close(got.neuron_act_sums, act, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(got.neuron_grad_sums, grad, rtol=1e-7, atol=1e-18)


@pytest.mark.parametrize("family, tied", [("qwen2_moe", False), ("gpt_oss", False), ("mixtral", True)])
def test_layerwise_gradients_equal_transformers_autograd(tmp_path, family, tied):
    """head_gradients then layer_backward, layer by layer, give the gradient of the loss with
    respect to every decoder layer's input that transformers' own model gives in one pass (tied:
    the output head is the embedding, stored once)."""
    path = tmp_path / family
    build(family, vocab_size=8192, tie_word_embeddings=tied).save_pretrained(path)
    ids = torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(0))
    scale = 1 / (2 * 11)
    runner = LayerwiseModel(path, dtype=torch.float64)
    states = runner.embed([ids])
    tape = []
    for i in range(runner.num_layers):
        tape.append(states[0])
        with runner.layer(i) as run:
            states[0] = run(0, states[0])
    grads = runner.head_gradients([ids], states, scale)
    ours = {}
    for i in reversed(range(runner.num_layers)):
        with runner.layer_backward(i) as vjp:
            grads[0] = vjp(0, tape[i], grads[0])
        ours[i] = grads[0]
    model = load_causal_lm(path, quiet=True, dtype=torch.float64, experts_implementation="eager")
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: inputs.__setitem__(
                i, kwargs.get("hidden_states", args[0] if args else None)
            ),
            with_kwargs=True,
        )
        for i, layer in enumerate(model.model.layers)
    ]
    out = model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for t in inputs.values():
        t.retain_grad()
    loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
    )
    (loss * scale).backward()
    for i in range(runner.num_layers):  # transformers' routers take their softmax in float32
        torch.testing.assert_close(ours[i], inputs[i].grad, rtol=1e-5, atol=1e-7)


def test_killed_backward_sweep_resumes_to_the_same_statistics(tmp_path, monkeypatch):
    model_dir = moelab_model(tmp_path / "m")
    options = dataclasses.replace(BACKWARD, snapshot_seconds=0.0)
    whole = calibrate(model_dir, tmp_path / "whole", options=options, quiet=True)
    import moelab.hf.layerwise as layerwise

    original = layerwise.LayerwiseModel.layer_backward
    seen = []

    def dying(self, index, **kwargs):
        seen.append(index)
        if len(seen) == 2:  # after the top layer's gradients were saved
            raise KeyboardInterrupt
        return original(self, index, **kwargs)

    monkeypatch.setattr(layerwise.LayerwiseModel, "layer_backward", dying)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model_dir, tmp_path / "resumed", options=options, quiet=True)
    monkeypatch.setattr(layerwise.LayerwiseModel, "layer_backward", original)
    resumed = calibrate(model_dir, tmp_path / "resumed", options=options, quiet=True)
    for i in whole.layers:
        a, b = whole.layer(i), resumed.layer(i)
        assert torch.equal(a.neuron_grad_sums, b.neuron_grad_sums) and torch.equal(
            a.neuron_act_sums, b.neuron_act_sums
        )
    assert not list((tmp_path / "resumed").glob("tape-*"))


# ----------------------------------------------------------------------------- the method


def hand_stats(act, grad, counts) -> LayerStats:
    """One source and one half holding per-neuron sums act, grad [E, I] and counts [E]."""
    act, grad = (torch.tensor(v, dtype=F64) for v in (act, grad))
    neurons = torch.zeros(2, 1, *act.shape, dtype=F64)
    first = (torch.tensor(0), torch.tensor(0))
    return stats_with(
        counts, neuron_act_sums=neurons.index_put(first, act), neuron_grad_sums=neurons.index_put(first, grad)
    )


def test_scores_are_the_product_of_the_two_per_token_means():
    stats = hand_stats([[4, 8, 2], [1, 1, 1], [9, 9, 9]], [[2, 1, 6], [3, 2, 1], [1, 1, 1]], [2, 1, 0])
    scores = neuron_scores(stats, Target(2))
    # expert 0: (4/2)(2/2)=2, (8/2)(1/2)=2, (2/2)(6/2)=3; expert 1: 3, 2, 1; expert 2: never routed
    assert scores.tolist() == [[2.0, 2.0, 3.0], [3.0, 2.0, 1.0], [-1.0, -1.0, -1.0]]
    assert neuron_scores(stats, Target(2, protect=frozenset({1})))[1].tolist() == [float("inf")] * 3


def test_scores_are_the_papers_fisher_form():
    """compression.md §4.2 from per-token records: S_ej = E_t[h_tj^2] * w_j^T H_e w_j with the D x D
    Fisher H_e = E_t[g_t g_t^T] over the tokens routed to e (g_t: the loss's gradient at the expert's
    output, w_j: column j of its down projection), against the scores of the sums the calibration
    keeps, h_j^2 and (dL/dh_j)^2 = (w_j . g_t)^2. Experts see 5, 2 and no tokens."""
    E, I, D = 3, 4, 6
    gen = torch.Generator().manual_seed(3)
    down = torch.randn(E, D, I, generator=gen, dtype=F64)
    act, grad = torch.zeros(E, I, dtype=F64), torch.zeros(E, I, dtype=F64)
    paper = torch.full((E, I), -1.0, dtype=F64)
    for e, n in enumerate((5, 2, 0)):
        if not n:
            continue
        h = torch.randn(n, I, generator=gen, dtype=F64)
        g = torch.randn(n, D, generator=gen, dtype=F64) * torch.arange(1, D + 1, dtype=F64)  # anisotropic
        act[e], grad[e] = (h**2).sum(0), ((g @ down[e]) ** 2).sum(0)
        fisher = sum(torch.outer(g_t, g_t) for g_t in g) / n
        for j in range(I):
            paper[e, j] = (h[:, j] ** 2).mean() * (down[e][:, j] @ fisher @ down[e][:, j])
    scores = neuron_scores(hand_stats(act.tolist(), grad.tolist(), [5, 2, 0]), Target(2))
    torch.testing.assert_close(scores, paper, rtol=1e-12, atol=0)


def test_uniform_layout_keeps_each_experts_best_neurons():
    view = make_view(E=3, I=3, top_k=1)
    stats = hand_stats([[4, 8, 2], [1, 1, 1], [9, 9, 9]], [[2, 1, 6], [3, 2, 1], [1, 1, 1]], [2, 1, 0])
    decision = get_method("heapr", layout="uniform").decide(view, stats, Target(2))  # keep 2/3 of neurons
    assert decision.notes == {"width": 2} and decision.kept == [0, 1, 2]
    experts = decision.edit.view.experts
    # expert 0 keeps neurons 2 and 0 (3 > 2 = 2, ties to the lower id), expert 1 keeps 0, 1; expert 2: 0, 1
    for e, ids in enumerate([[0, 2], [0, 1], [0, 1]]):
        assert torch.equal(experts.gate[e], view.experts.gate[e, ids])
        assert torch.equal(experts.up[e], view.experts.up[e, ids])
        assert torch.equal(experts.down[e], view.experts.down[e][:, ids])
    with pytest.raises(ValueError, match="cannot spare protected"):
        get_method("heapr", layout="uniform").decide(view, stats, Target(2, protect=frozenset({0})))


def test_uniform_width_rounds_to_the_nearest_neuron():
    """Keep 4 of 5 experts' worth of 7 neurons each: 5.6 -> 6 neurons per expert (not 5)."""
    g = torch.Generator().manual_seed(0)
    act, grad = (torch.rand(5, 7, generator=g, dtype=F64).tolist() for _ in range(2))
    decision = get_method("heapr", layout="uniform").decide(
        make_view(E=5, I=7, top_k=1), hand_stats(act, grad, [1, 2, 3, 4, 5]), Target(4)
    )
    assert decision.notes == {"width": 6} and decision.edit.view.experts.gate.shape[1] == 6
    with pytest.raises(ValueError, match="keeps none; lower the ratio"):  # the writer said "hidden_dim must be >= 1"
        get_method("heapr", layout="uniform").decide(make_view(E=5, I=2, top_k=1), hand_stats(
            [[1, 1]] * 5, [[1, 1]] * 5, [1, 2, 3, 4, 5]), Target(1))


def test_uniform_width_of_real_sized_experts_is_a_multiple_of_8():
    """A width transformers' grouped GEMMs take in bf16 (16-byte rows): 256 x 2.4 / 8 = 76.8
    neurons -> 80, never all or none of them; narrow experts (below 64) keep the nearest count."""
    assert uniform_width(256, 8, 2.4) == 80 and uniform_width(256, 8, 6.0) == 192  # already a multiple
    assert uniform_width(64, 8, 0.1) == 8 and uniform_width(64, 8, 7.9) == 56
    assert uniform_width(60, 8, 2.4) == 18 and uniform_width(48, 8, 2.4) == 14  # not a multiple of 8 / narrow


def test_uniform_width_in_a_quantized_formats_blocks():
    """align (keep_quantized: whole float8 blocks, MXFP4 groups): the nearest multiple of it that
    keeps some but not all neurons, whatever the experts' size; refused where none does."""
    assert uniform_width(2048, 8, 2.4, align=128) == 640  # 614.4 -> 5 blocks
    assert uniform_width(2048, 8, 7.9, align=128) == 1920 and uniform_width(2048, 8, 0.1, align=128) == 128
    assert uniform_width(32, 4, 3.0, align=16) == 16  # 24 is no multiple: 32 keeps all, so 16
    for hidden_dim in (32, 200):  # one block only; not whole blocks
        with pytest.raises(ValueError, match=f"{hidden_dim} neurons cannot be narrowed in whole blocks of 32"):
            uniform_width(hidden_dim, 8, 4.0, align=32)


def test_padded_layout_ranks_neurons_of_all_layers_together():
    """Two layers, 2 experts x 2 neurons each, keep half: the 4 best of 8 scores overall."""
    method = get_method("heapr", layout="padded")
    layer0 = hand_stats([[1, 10], [1, 1]], [[1, 10], [1, 1]], [1, 1])  # scores [[1, 100], [1, 1]]
    layer1 = hand_stats([[5, 3], [7, 2]], [[1, 1], [1, 1]], [1, 1])  # scores [[5, 3], [7, 2]]
    layer1.layer = 1
    method.prepare(None, {0: layer0, 1: layer1}, {0: Target(1), 1: Target(1)})
    views = [make_view(E=2, I=2, top_k=1, index=i, seed=i) for i in (0, 1)]
    d0 = method.decide(views[0], layer0, Target(1))
    d1 = method.decide(views[1], layer1, Target(1))
    assert d0.notes["kept_neurons"] == [1, 0] and d1.notes["kept_neurons"] == [2, 1]  # 100; 7, 5, 3
    assert d0.notes["compact_parameters"] == 1 * 3 * 8 and d0.notes["stored_parameters"] == 4 * 3 * 8
    experts = d0.edit.view.experts
    assert (experts.down[0][:, 0] == 0).all() and torch.equal(
        experts.down[0][:, 1], views[0].experts.down[0][:, 1]
    )
    assert (experts.gate[1] == 0).all() and (experts.up[1] == 0).all()


def test_scores_on_one_half_read_that_half_alone():
    """Target.halves picks the halves of every HEAPr sum (activations, gradients and counts)."""
    a = hand_stats([[4, 8, 2], [1, 1, 1]], [[2, 1, 6], [3, 2, 1]], [2, 1])
    b = hand_stats([[1, 2, 3], [5, 5, 5]], [[7, 1, 1], [1, 2, 3]], [1, 3])
    names = ("tokens", "counts", "neuron_act_sums", "neuron_grad_sums")
    both = dataclasses.replace(a, **{n: getattr(a, n) + getattr(b, n).flip(0) for n in names})
    assert torch.equal(neuron_scores(both, Target(1, halves=(0,))), neuron_scores(a, Target(1)))
    assert torch.equal(neuron_scores(both, Target(1, halves=(1,))), neuron_scores(b, Target(1)))


def test_padded_budget_rounds_to_the_nearest_neuron():
    """2 experts x 3 neurons keeping 1.25 experts' worth: round(3.75) = 4 neurons, not 3."""
    method = get_method("heapr", layout="padded")
    stats = hand_stats([[1, 2, 3], [4, 5, 6]], [[1, 1, 1], [1, 1, 1]], [1, 1])
    method.prepare(None, {0: stats}, {0: Target(1.25)})
    decision = method.decide(make_view(E=2, I=3, top_k=1), stats, Target(1.25))
    assert decision.notes["kept_neurons"] == [1, 3]


def test_padded_ties_across_experts_keep_exactly_the_budget():
    """Equal scores everywhere: the cut falls inside the tie and the layer keeps its budget, the
    lower (expert, neuron) ids first."""
    method = get_method("heapr", layout="padded")
    stats = hand_stats([[1, 1], [1, 1]], [[1, 1], [1, 1]], [1, 1])
    method.prepare(None, {0: stats}, {0: Target(1)})
    assert method.decide(make_view(E=2, I=2, top_k=1), stats, Target(1)).notes["kept_neurons"] == [2, 0]


def test_padded_budget_that_keeps_every_neuron_is_refused():
    stats = hand_stats([[1, 2, 3], [4, 5, 6]], [[1, 1, 1], [1, 1, 1]], [1, 1])
    with pytest.raises(ValueError, match="keeps all 6 neurons"):
        get_method("heapr", layout="padded").prepare(None, {0: stats}, {0: Target(1.98)})


def test_narrowed_and_zeroed_experts_compute_the_same():
    view = make_view(E=2, I=5, top_k=1, seed=3)
    keep = [[0, 3, 4], [1, 2, 4]]
    narrow, padded = narrowed(view.experts, keep), zeroed(view.experts, keep)
    x = torch.randn(8, dtype=F64)
    for e in range(2):
        a = narrow.down[e] @ (silu(narrow.gate[e] @ x) * (narrow.up[e] @ x))
        b = padded.down[e] @ (silu(padded.gate[e] @ x) * (padded.up[e] @ x))
        ids = keep[e]
        c = view.experts.down[e][:, ids] @ (
            silu(view.experts.gate[e, ids] @ x) * (view.experts.up[e, ids] @ x)
        )
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12)


def test_narrowed_and_zeroed_experts_with_biases_compute_the_kept_neurons():
    """Experts with gate, up and down biases (GPT-OSS's): a narrowed expert keeps the biases of its
    kept neurons, a zeroed one zeroes the others'; both compute the kept neurons' sum plus the down bias."""
    view = make_view(E=2, I=5, top_k=1, seed=3)
    g = torch.Generator().manual_seed(4)
    experts = dataclasses.replace(
        view.experts, **{name: torch.randn(2, n, generator=g, dtype=F64) for name, n in
                         (("gate_bias", 5), ("up_bias", 5), ("down_bias", 8))},
    )  # fmt: skip
    keep = [[0, 3, 4], [1, 2, 4]]
    x = torch.randn(8, generator=g, dtype=F64)
    for edited in (narrowed(experts, keep), zeroed(experts, keep)):
        module = experts_from_view(edited).double()
        for e, ids in enumerate(keep):
            hidden = silu(experts.gate[e, ids] @ x + experts.gate_bias[e, ids]) * (
                experts.up[e, ids] @ x + experts.up_bias[e, ids]
            )
            expected = experts.down[e][:, ids] @ hidden + experts.down_bias[e]
            got = module(x[None], [1 - e, e])[0]  # the one row goes to expert e
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_heapr_end_to_end_and_its_refusals(tmp_path):
    model_dir = moelab_model(tmp_path / "m")
    stats = calibrate(model_dir, tmp_path / "s", options=BACKWARD, quiet=True).directory
    report = compress(model_dir, tmp_path / "out", method="heapr", ratio=0.25, stats=stats, quiet=True)
    assert report["options"] == {"layout": "uniform"}
    assert (
        report["parameters"]["after"]["routed_experts"]
        == report["parameters"]["before"]["routed_experts"] * 3 // 4
    )
    assert load_pretrained(tmp_path / "out").config.moe.hidden_dim == 24
    no_grads = calibrate(model_dir, tmp_path / "s2", options=SMALL, quiet=True).directory
    with pytest.raises(ValueError, match=r"needs the \['neurons'\] statistics"):
        compress(model_dir, tmp_path / "out2", method="heapr", stats=no_grads, quiet=True)
    deepseek = hf_model(tmp_path / "ds", "deepseek_v3")
    with pytest.raises(ValueError, match="shared experts take their width"):
        compress(deepseek, tmp_path / "o", method="heapr", method_options={"layout": "uniform"}, quiet=True)
    assert not (tmp_path / "o").exists()
