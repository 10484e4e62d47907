"""torch.compile(layer) equals eager, forward and backward; graph breaks are recorded with
torch._dynamo.explain and printed (run with -s to see them)."""

import pytest
import torch
from reference import assert_close

from moelab.nn import MoEConfig, build_moe

pytestmark = pytest.mark.slow

CASES = {
    "topk": dict(router="topk", top_k=2, num_shared=1, capacity_factor=1.0),
    "topp": dict(router="topp", top_p=0.6),  # variable k
}


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of the opaque op `moelab::routed_experts` made while the test runs (its
    implementation looks the layer up once per call; the compiled graph calls it from C++)."""
    from moelab.nn import opaque

    class Counting:
        def __init__(self, layers):
            self.layers, self.calls, self.keys = layers, 0, set()

        def get(self, key):
            self.calls += 1
            self.keys.add(key)
            return self.layers.get(key)

        def __setitem__(self, key, layer):
            self.layers[key] = layer

    counting = Counting(opaque._LAYERS)
    monkeypatch.setattr(opaque, "_LAYERS", counting)
    return counting


def _layer(name):
    torch.manual_seed(0)
    return build_moe(MoEConfig(dim=16, num_experts=4, hidden_dim=8, balance_coef=0.01, z_coef=1e-3, **CASES[name]))


def _run(layer, x):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y, result = layer(x)
    (y.pow(2).sum() + result.loss).backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), result, x.grad, grads


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_layer_matches_eager(name):
    torch._dynamo.reset()
    layer = _layer(name)
    compiled = torch.compile(layer)
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 8), (2, 8), (3, 5)]:  # a repeat (cached graph) and a new token count
        x = torch.randn(*shape, 16, generator=g)
        y_c, res_c, gx_c, grads_c = _run(compiled, x)
        y_e, res_e, gx_e, grads_e = _run(layer, x)
        assert_close(y_c, y_e, what="y")
        assert_close(gx_c, gx_e, what="grad x")
        assert grads_c.keys() == grads_e.keys()
        for n in grads_e:
            assert_close(grads_c[n], grads_e[n], what=f"grad {n}")
        assert res_c.losses.keys() == res_e.losses.keys()
        for n in res_e.losses:
            assert_close(res_c.losses[n], res_e.losses[n], what=f"loss {n}")
        assert torch.equal(res_c.tokens_per_expert, res_e.tokens_per_expert)
        assert float(res_c.dropped_fraction) == pytest.approx(float(res_e.dropped_fraction))


@pytest.mark.parametrize("compiled_gather_bytes", [2**23, 0], ids=["gathered", "opaque op"])
def test_compiled_infer_and_forward_add_the_output_bias_once(compiled_gather_bytes):
    """A layer with an output bias (JetMoE's), compiled: `infer` on the gathered path and through
    the opaque op, and `forward`, give the eager plain layer's output plus the bias."""
    from moelab.nn import MoELayer

    torch._dynamo.reset()
    plain = build_moe(MoEConfig(dim=16, num_experts=4, hidden_dim=8, top_k=2, num_shared=1))
    bias = torch.randn(16, generator=torch.Generator().manual_seed(3))
    layer = MoELayer(plain.router, plain.experts, plain.shared, output_bias=bias).eval()
    layer.compiled_gather_bytes = compiled_gather_bytes
    infer, forward = torch.compile(layer.infer), torch.compile(layer)
    with torch.no_grad():
        for T in (1, 3):
            x = torch.randn(T, 16, generator=torch.Generator().manual_seed(T))
            expected = plain(x)[0] + bias
            assert_close(infer(x), expected, what=f"compiled infer, {T} tokens")
            assert_close(forward(x)[0], expected, what=f"compiled forward, {T} tokens")


@pytest.mark.parametrize("name", list(CASES))
def test_graph_breaks_are_recorded(name):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_layer(name))(torch.randn(2, 8, 16))
    print(f"\n[{name}] graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")
    for reason in explanation.break_reasons:
        where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(reason.user_stack[-2:]))
        print(f"  break: {reason.reason.splitlines()[0]} at {where}")
    assert explanation.graph_count >= 1


@pytest.mark.parametrize(("batch", "compiled_gather_bytes", "opaque"), [(1, 0, False), (2, 2**23, False), (2, 0, True), (3, 2**23, True)])
def test_compiled_generate_decodes_the_eager_tokens(batch, compiled_gather_bytes, opaque, op_calls):
    """generate(compile=True) runs every step after the prompt as one compiled graph: one token's
    experts on gathered weights whatever their size; 2 tokens (2 x top-2 = 4 experts) gathered
    up to compiled_gather_bytes (even where eager decoding would not gather: gather_bytes 0),
    else through the opaque op `routed_experts`; 3 tokens (more rows than experts) always through
    the op. All give the eager tokens."""
    from test_model import make_model, random_ids
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = make_model(init_std=0.2).eval()
    for moe in model.moe_layers.values():
        moe.compiled_gather_bytes, moe.gather_bytes = compiled_gather_bytes, 0
    ids = random_ids(batch=batch, seq=5)
    want = model.generate(ids, 12, greedy=True)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(ids, 12, greedy=True, compile=True), want)
    assert torch.equal(model.generate(ids, 12, greedy=True, compile=True), want)  # the traced step again
    assert counters["stats"]["unique_graphs"] == graphs + 1, "one graph, traced once"
    assert op_calls.calls == (2 * 11 * len(model.moe_layers) if opaque else 0), "11 compiled steps a call"


@pytest.mark.parametrize("compiled_gather_bytes", [2**23, 0])
def test_a_compiled_step_decodes_a_left_padded_batch_as_eager(compiled_gather_bytes):
    """The static step takes the padding ([B] slots) as an input: per-sequence positions and a
    [B, 1, 1, max_len] mask, on gathered weights and through the opaque op; the eager tokens."""
    from test_model import left_padded, make_model, random_ids

    torch._dynamo.reset()
    model = make_model(init_std=0.2).eval()
    for moe in model.moe_layers.values():
        moe.compiled_gather_bytes = compiled_gather_bytes
    prompts = [random_ids(batch=1, seq=n, seed=n)[0] for n in (5, 2)]
    ids, mask = left_padded(prompts, torch.zeros(2, 5, dtype=torch.long))
    want = model.generate(ids, 10, attention_mask=mask, greedy=True)
    assert torch.equal(model.generate(ids, 10, attention_mask=mask, greedy=True, compile=True), want)


def test_compiled_generate_sees_weights_changed_after_compiling():
    """The compiled step freezes the weights into its graph: after an in-place update (an
    optimizer step) or a loaded state it must trace again, never decode with stale weights."""
    from test_model import make_model, random_ids

    torch._dynamo.reset()
    model = make_model(init_std=0.2).eval()
    ids = random_ids(batch=1, seq=5)
    model.generate(ids, 8, greedy=True, compile=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # in place: the same tensor, a new version
    assert torch.equal(model.generate(ids, 8, greedy=True, compile=True), model.generate(ids, 8, greedy=True))
    other = make_model(seed=3, init_std=0.2).eval()
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.generate(ids, 8, greedy=True, compile=True), other.generate(ids, 8, greedy=True))


def test_after_an_in_place_update_the_step_reads_the_weights_and_is_not_traced_again():
    """The first step freezes the weights; after they change in place it is traced once more with
    the weights as inputs, and later updates decode with the new weights without a new trace. New
    tensors (not in place) still trace again, and a model never updated keeps its frozen step."""
    from test_model import make_model, random_ids
    from torch._dynamo.utils import counters

    from moelab.models.transformer import _compiled_steps

    torch._dynamo.reset()
    model = make_model(init_std=0.2).eval()
    ids = random_ids(batch=1, seq=5)
    model.generate(ids, 8, greedy=True, compile=True)
    assert _compiled_steps[model].frozen
    tokens = []
    for update in range(4):
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)  # flips the logits: different tokens at every update
        if update == 1:
            traced = counters["stats"]["unique_graphs"]
        tokens.append(model.generate(ids, 8, greedy=True, compile=True))
        assert torch.equal(tokens[-1], model.generate(ids, 8, greedy=True))
        assert not _compiled_steps[model].frozen
    assert not torch.equal(tokens[0], tokens[1]), "the updates must change the tokens for this test to mean anything"
    assert counters["stats"]["unique_graphs"] == traced, "updates after the first one traced nothing"
    model.lm_head.weight = torch.nn.Parameter(-model.lm_head.weight.detach().clone())  # a new tensor
    assert torch.equal(model.generate(ids, 8, greedy=True, compile=True), model.generate(ids, 8, greedy=True))
    assert counters["stats"]["unique_graphs"] > traced and not _compiled_steps[model].frozen


def test_compiled_generate_sees_settings_changed_after_compiling():
    """The compiled step keeps no guards on the modules: a module setting changed after compiling
    (NAEE's skip ratio here) must trace it again, never decode with the old setting."""
    from test_model import make_model, random_ids

    from moelab.compress.skipping import apply_dynamic_skipping

    torch._dynamo.reset()
    model = make_model(init_std=0.2).eval()
    ids = random_ids(batch=1, seq=5)
    plain = model.generate(ids, 12, greedy=True, compile=True)
    layers = [i for i, block in enumerate(model.layers) if block.kind == "moe"]
    apply_dynamic_skipping(model, {i: 0.99 for i in layers})  # keeps only each token's first expert
    skipped = model.generate(ids, 12, greedy=True)
    assert not torch.equal(skipped, plain), "the setting must change the tokens for this test to mean anything"
    assert torch.equal(model.generate(ids, 12, greedy=True, compile=True), skipped)
    apply_dynamic_skipping(model, None)
    assert torch.equal(model.generate(ids, 12, greedy=True, compile=True), plain)


@pytest.mark.parametrize("batch", [2, 3])
def test_the_step_has_no_graph_break_whichever_way_its_experts_run(batch):
    """Batch 2 with gather_bytes 0 (eager decoding would go expert by expert, reading the routing
    on the host) keeps the gathered form inside the graph; batch 3 runs the opaque op. Neither
    breaks the graph."""
    from test_model import make_model, random_ids

    from moelab.models import KVCache

    torch._dynamo.reset()
    model = make_model(init_std=0.2).eval()
    for moe in model.moe_layers.values():
        moe.gather_bytes = 0
    ids = random_ids(batch=batch, seq=5)
    cache = KVCache(model.config, batch_size=batch, max_len=64)
    with torch.no_grad():
        model._decode(ids, cache, 0)
        explanation = torch._dynamo.explain(model._decode)(ids[:, :1], cache, torch.tensor(5))
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    ops = [n.target for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert (torch.ops.moelab.routed_experts.default in ops) == (batch == 3), "the op runs exactly where it must"


@pytest.mark.parametrize("offload", [[], ["--resident", "0.25"]])
def test_generate_command_with_compile_gives_the_eager_text(offload):
    from typer.testing import CliRunner

    from moelab.cli import app

    torch._dynamo.reset()
    runner = CliRunner()
    args = ["generate", "The king said", "--max-new-tokens", "12", *offload]
    plain, compiled = runner.invoke(app, args), runner.invoke(app, [*args, "--compile"])
    assert plain.exit_code == 0 and compiled.exit_code == 0, plain.output + compiled.output
    assert compiled.output.split("\n12 tokens in ")[0] == plain.output.split("\n12 tokens in ")[0]
    assert "(compiling included)" in compiled.output


ARCHITECTURES = [
    "moe_top2", "dense", "aux_free", "blockffn", "coe2", "coe_3x_experts", "deepseek", "hash", "mole", "rexmoe",
    "topp", "zero_computation",
]


@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_compiles_its_step_whole(name, batch, op_calls):
    """configs/models/*.yaml (sequence-routed and non-causal ones, expert choice, excepted: they
    decode without a cache, recomputing the prefix): the
    compiled step has no graph break (it is compiled with fullgraph) and decodes the eager tokens,
    with weights scaled up so that the routing is far from uniform; batch 9 takes more rows than
    any of them has experts, so its experts run through the opaque op, and is left-padded (prompts of
    8 down to 1 token: the static step's per-sequence positions and mask)."""
    from pathlib import Path

    from moelab.models import ModelConfig, MoETransformer

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig.load(Path(__file__).parents[1] / "configs" / "models" / f"{name}.yaml")
    model = MoETransformer(cfg).eval()
    with torch.no_grad():  # not the embedding (most configs tie the head to it): scaled, it made a model that
        for p in model.parameters():  # repeats its last token, so the steps' tokens told nothing of their context
            if p.dim() > 1 and p is not model.embed.weight:
                p.mul_(3.0)
    ids = torch.randint(0, cfg.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(8) >= torch.arange(batch)[:, None].clamp(max=7)).long() if batch > 1 else None
    want = model.generate(ids, 6, attention_mask=mask, greedy=True)
    assert torch.equal(model.generate(ids, 6, attention_mask=mask, greedy=True, compile=True), want)
    assert (op_calls.calls > 0) == (batch == 9 and bool(model.moe_layers)), "batch 9: the experts run in the op"
    if batch == 1:  # a longer cache than the first call's: traced once more, with its length dynamic
        assert torch.equal(model.generate(ids, 60, greedy=True, compile=True), model.generate(ids, 60, greedy=True))


def test_a_second_cache_length_traces_once_more_and_serves_every_later_length():
    """The first call of a batch size traces its cache length statically; a call of another length
    traces a graph whose cache length is dynamic, which then serves every length (before, each
    length rounded up to 64 was a new trace). Each call gives the eager tokens."""
    from test_model import make_model, random_ids
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = make_model(init_std=0.2, max_seq_len=256).eval()
    ids = random_ids(batch=1, seq=5)
    traced = [counters["stats"]["unique_graphs"]]
    for new_tokens in (12, 80, 150, 12, 40):  # cache lengths 64, 128, 192, 64 (the static graph), 64
        want = model.generate(ids, new_tokens, greedy=True)
        assert torch.equal(model.generate(ids, new_tokens, greedy=True, compile=True), want), new_tokens
        traced.append(counters["stats"]["unique_graphs"])
    assert [b - a for a, b in zip(traced, traced[1:])] == [1, 1, 0, 0, 0], traced


def test_a_graph_break_in_the_step_is_an_error_not_wrong_tokens():
    """Without module guards, the code after a break inside one layer would serve every layer;
    the step is compiled whole, so a break (here one each block's forward asks for) raises. Forward
    hooks, which the compiled step would not call at every step, are refused before compiling."""
    from test_model import make_model, random_ids

    torch._dynamo.reset()
    model = make_model(init_std=0.2).eval()
    model.layers[0].register_forward_hook(lambda module, args, out: None)
    with pytest.raises(ValueError, match="calls no forward hooks"):
        model.generate(random_ids(batch=1, seq=5), 4, greedy=True, compile=True)
    model = make_model(init_std=0.2).eval()
    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, forward=forward, **kwargs: (torch._dynamo.graph_break(), forward(*args, **kwargs))[1]
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model.generate(random_ids(batch=1, seq=5), 4, greedy=True, compile=True)


def test_two_models_decoding_in_turn_each_use_their_own_weights_and_graphs():
    """The compiled graphs keep no guards on the modules: a model that compiles its step after
    another must not serve its graph to the first one's next call, and each keeps its own (no
    tracing again when they take turns)."""
    from test_model import make_model, random_ids
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    first, second = make_model(init_std=0.2).eval(), make_model(seed=3, init_std=0.2).eval()
    ids = random_ids(batch=1, seq=5)
    want = {m: m.generate(ids, 8, greedy=True) for m in (first, second)}
    assert not torch.equal(want[first], want[second]), "the models must decode differently for this test to mean anything"
    traced = []
    for model in (first, second, first, second):
        assert torch.equal(model.generate(ids, 8, greedy=True, compile=True), want[model])
        traced.append(counters["stats"]["unique_graphs"])
    assert traced[0] < traced[1] == traced[2] == traced[3], traced


def test_a_compiled_step_does_not_keep_its_model_alive():
    import gc
    import weakref

    from test_model import make_model, random_ids

    model = make_model(init_std=0.2).eval()
    model.generate(random_ids(batch=1, seq=5), 4, greedy=True, compile=True)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_model_holding_another_module_of_the_same_tensors_traces_again(op_calls):
    """The graph names MoE layers by id: a layer replaced by another over the same router and
    experts (same tensors, same settings) must not leave the old layer's id in the graph (were
    the old layer freed, its id could name any other layer)."""
    import copy

    from test_model import make_model, random_ids

    torch._dynamo.reset()
    model = make_model(init_std=0.2).eval()
    ids = random_ids(batch=3, seq=5)  # through the op
    want = model.generate(ids, 6, greedy=True)
    assert torch.equal(model.generate(ids, 6, greedy=True, compile=True), want)
    old = {}
    for i, block in enumerate(model.layers):
        if block.moe is not None:
            old[i] = block.moe  # kept alive: without the rule the stale graph would quietly call them
            block.ffn = copy.copy(old[i])  # another object, the same submodules and settings
    op_calls.keys.clear()
    assert torch.equal(model.generate(ids, 6, greedy=True, compile=True), want)
    assert op_calls.keys == {id(moe) for moe in model.moe_layers.values()}


def test_compiling_a_step_leaves_other_compiled_code_alone():
    """moelab's compiled step never resets dynamo: a user's own compiled function keeps its graph."""
    from test_model import make_model, random_ids
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    users = torch.compile(lambda x: (x * 2).sin())
    x = torch.randn(8)
    users(x)
    model = make_model(init_std=0.2).eval()
    model.generate(random_ids(batch=1, seq=5), 4, greedy=True, compile=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # traced again
    model.generate(random_ids(batch=1, seq=5), 4, greedy=True, compile=True)
    before = counters["stats"]["unique_graphs"]
    users(x)
    assert counters["stats"]["unique_graphs"] == before, "the user's graph was dropped and traced again"


@pytest.mark.parametrize("resident", [0.34, 1.0])
def test_offloaded_experts_decode_compiled_with_the_eager_tokens_and_cache_decisions(tmp_path, resident, op_calls):
    """An offloaded moelab checkpoint (experts fetched into a cache by the routing) compiles its
    step whole, the fetch and the experts inside the opaque op: the tokens of the model in memory,
    and the same hits, misses and evictions as eager offloaded decoding, at batch 1 and 3."""
    import dataclasses

    from moelab.models import MoETransformer, save_pretrained, tiny
    from moelab.offload import load_offloaded

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), n_layers=3, first_k_dense=0)
    model = MoETransformer(cfg).eval()
    save_pretrained(model, tmp_path / "m")
    for batch in (1, 3):
        ids = torch.randint(0, cfg.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(batch))
        want = model.generate(ids, 10, greedy=True)
        stats = {}
        for compile in (False, True):
            offloaded = load_offloaded(tmp_path / "m", resident=resident)
            try:
                assert torch.equal(offloaded.generate(ids, 10, compile=compile), want)
                stats[compile] = {n: (s.requests, s.hits, s.late, s.misses) for n, s in offloaded.cache.stats.items()}
            finally:
                offloaded.close()
        assert stats[True] == stats[False]
        assert op_calls.calls == 9 * len(model.moe_layers), "9 compiled steps, every layer's experts in the op"
        op_calls.calls = 0


def test_bench_offload_times_the_compiled_step_with_the_eager_hits(tmp_path, op_calls):
    """`moelab bench offload --compile`: the no-read-ahead policies also decode compiled, after a
    tracing run and a restart of the cache, so with the eager rows' hits; the in-memory model
    is timed compiled too."""
    import dataclasses
    import json

    from typer.testing import CliRunner

    from moelab.cli import app
    from moelab.models import MoETransformer, save_pretrained, tiny

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), vocab_size=8192, n_layers=3, first_k_dense=0, init_std=0.2)
    save_pretrained(MoETransformer(cfg), tmp_path / "model")
    out = tmp_path / "offload.json"
    args = ["bench", "offload", str(tmp_path / "model"), "--resident", "0.5", "--prompts", "2", "--new-tokens", "6",
            "--rounds", "1", "--compile", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [model] = json.loads(out.read_text())["models"]
    assert model["in_memory_compiled_tokens_per_s"] > 0 and model["in_memory_compiled_vs_memory"] > 0
    rows = {(r["policy"], r["compiled"]): r for r in model["rows"]}
    for policy in ("lru", "reuse"):
        eager, compiled = rows[policy, False], rows[policy, True]
        assert compiled["same_tokens"]
        assert compiled["hit_rate"] == eager["hit_rate"] < 1 and compiled["reads_per_token"] == eager["reads_per_token"]
    assert ("lookahead", True) not in rows, "read-ahead cannot be compiled"
    assert op_calls.calls > 0
