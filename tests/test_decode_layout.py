"""Column-major weights for decoding on a CPU (`moelab.models.decode_layout`): the same values,
shapes and Parameter objects, every decode path and the training step on them against the
row-major model and a float64 copy, and what `generate` leaves behind (saving, training)."""

import copy

import numpy as np
import pytest
import torch
from reference import F64, assert_close
from test_decode import PATHS
from test_model import make_model, random_ids
from test_moe_layer import make_layer, tokens

from moelab.models import load_pretrained, save_pretrained
from moelab.models.config import UoEConfig
from moelab.models.decode_layout import (
    decode_layout_weights,
    is_column_major,
    side_by_side,
    store_apart,
    use_decode_layout,
    use_row_major_layout,
)
from moelab.nn import SwiGLUExperts
from moelab.nn.grouped import gathered_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = dict(moe_fields=dict(num_shared=1, shared_gate=True), tie_embeddings=True, init_std=0.2)


def column_major_copy(module):
    moved = copy.deepcopy(module)
    assert use_decode_layout(moved) > 0
    return moved


def test_layout_keeps_values_shapes_parameters_and_ties():
    model = make_model(**FEATURES)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    params = dict(model.named_parameters())
    moved = decode_layout_weights(model)
    row_major = sum(not is_column_major(w) for w in moved)  # a [1, D] matrix is both
    names = {name for name, p in params.items() if any(p is m for m in moved)}
    # every attention, dense, shared-expert and output matrix and the stacked experts; not routers or norms
    assert {"layers.1.ffn.experts.gate_up_proj", "layers.1.ffn.experts.down_proj", "embed.weight"} <= names
    assert {"layers.0.attn.q_proj.weight", "layers.0.ffn.down_proj.weight", "layers.1.ffn.shared.up_proj.weight"} <= names
    assert not any("router" in name or "norm" in name for name in names)
    assert use_decode_layout(model) == row_major > 0
    assert dict(model.named_parameters()) == params  # the same objects
    assert model.lm_head.weight is model.embed.weight
    for name, t in model.state_dict().items():
        assert t.shape == before[name].shape and torch.equal(t, before[name]), name
    for weight in moved:
        assert is_column_major(weight) and (weight.shape[-2] == 1 or not weight.is_contiguous())
    pointers = [w.data_ptr() for w in moved]
    assert use_decode_layout(model) == 0  # already in place: nothing copied
    assert [w.data_ptr() for w in moved] == pointers
    assert use_row_major_layout(model) == row_major and use_row_major_layout(model) == 0
    assert all(p.is_contiguous() for p in model.parameters())
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_layout_skips_uoe_blocks_fp16_and_tensors_off_the_cpu():
    uoe = UoEConfig(attn_top_k=2, mlp_experts=4, mlp_top_k=2)
    model = make_model(moe=None, uoe=uoe, n_kv_heads=None, first_k_dense=0, tie_embeddings=False)
    moved = {id(w) for w in decode_layout_weights(model)}
    assert not any(id(p) in moved for p in model.layers.parameters())  # UoE blocks view their weights
    assert moved == {id(model.lm_head.weight)}
    assert decode_layout_weights(torch.nn.Linear(4, 4, device="meta")) == []
    assert decode_layout_weights(make_model().to(torch.float16)) == []
    every = len(decode_layout_weights(make_model()))
    assert len(decode_layout_weights(make_model().to(torch.bfloat16))) == every
    cast = column_major_copy(SwiGLUExperts(4, 16, 8)).to(torch.bfloat16)  # a plain module's cast keeps the strides
    assert use_row_major_layout(cast) == 2 and all(p.is_contiguous() for p in cast.parameters())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("T", [1, 3, 40])
def test_every_infer_path_on_column_major_experts_equals_float64(path, T):
    """infer of 1, 3 and 40 tokens on the gathered, accumulated and grouped_mm paths, with the
    layer's matrices column-major, against a float64 copy of the layer (row-major)."""
    layer, _ = make_layer(num_shared=1)
    reference = copy.deepcopy(layer).to(F64)
    moved = PATHS[path](column_major_copy(layer))
    x = tokens(T)
    with torch.no_grad():
        assert_close(moved.infer(x), reference.infer(x.to(F64)), what=f"{path}, {T} tokens")


def test_training_step_on_column_major_weights_equals_float64():
    """forward and backward of the whole model with every matrix column-major: loss, the
    input-side gradients of every parameter against a float64 row-major copy; the gradients
    come back in the parameters' own layout (row-major for the attention projections stored side
    by side: torch gives a view with gaps a contiguous gradient)."""
    model = make_model(**FEATURES)
    reference = copy.deepcopy(model).to(F64)
    moved = column_major_copy(model)
    ids = random_ids(batch=2, seq=12)
    out, ref = moved(ids, ids), reference(ids, ids)
    assert_close(out.loss, ref.loss, what="loss")
    (out.loss + out.aux_loss).backward()
    (ref.loss + ref.aux_loss).backward()
    expected = dict(reference.named_parameters())
    for name, p in moved.named_parameters():
        assert_close(p.grad, expected[name].grad, what=f"grad {name}")
        side_by_side = name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
        assert p.grad.stride() == (p.grad.contiguous().stride() if side_by_side else p.stride()), name


def test_generate_moves_the_weights_and_decodes_as_the_float64_model():
    """generate on a CPU stores the matrices column-major (out of inference mode, so the model
    trains afterwards); its decode steps give the float64 row-major model's logits and its
    greedy tokens; the model then saves and reloads to the same values."""
    model = make_model(**FEATURES).eval()
    reference = copy.deepcopy(model).to(F64)
    ids = random_ids(batch=2, seq=5)
    tokens_ = model.generate(ids, 6, greedy=True)
    assert all(is_column_major(w) for w in decode_layout_weights(model))
    assert torch.equal(tokens_, reference.generate(ids, 6, greedy=True))
    with torch.inference_mode():
        assert_close(model.decode_step(tokens_), reference.decode_step(tokens_), what="logits")
    model.train()
    out = model(ids, ids)
    out.loss.backward()  # inference tensors would refuse to be saved for backward
    assert model.embed.weight.grad is not None


def test_a_model_made_in_inference_mode_decodes_on_inference_tensors():
    """Parameters made in inference mode are moved there too (a normal tensor swapped into an
    inference parameter breaks every later product: "Inference tensors do not track version
    counter"), and decode as the float64 model."""
    with torch.inference_mode():
        model = make_model(**FEATURES).eval()
        reference = copy.deepcopy(model).to(F64)
        ids = random_ids(batch=1, seq=4)
        tokens_ = model.generate(ids, 4, greedy=True)
        assert all(is_column_major(w) and w.is_inference() for w in decode_layout_weights(model))
        assert torch.equal(tokens_, reference.generate(ids, 4, greedy=True))
        assert use_row_major_layout(model) > 0 and all(p.is_inference() for p in model.parameters())


def test_a_model_saved_after_generate_reloads_equal(tmp_path):
    model = make_model(**FEATURES).eval()
    model.generate(random_ids(batch=1, seq=4), 2, greedy=True)
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.embed.weight


@pytest.mark.parametrize("T", [1, 2])
def test_gathered_mlp_reads_either_layout(T):
    """The gathered copies (T > 1) and the one-token path (T = 1) on row- and column-major
    experts give the same result."""
    experts = SwiGLUExperts(6, 16, 8)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    moved = column_major_copy(experts)
    x = tokens(T)
    indices = torch.tensor([[4, 1], [1, -1]])[:T]
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0]])[:T]
    args = dict(activation="silu", gated=True)
    with torch.no_grad():
        got = gathered_mlp(x, indices, weights, moved.gate_up_proj, None, moved.down_proj, None, **args)
        expected = gathered_mlp(x, indices, weights, experts.gate_up_proj, None, experts.down_proj, None, **args)
    assert_close(got, expected, atol=1e-6, rtol=1e-6, what=f"{T} tokens")


@pytest.mark.slow  # torch.compile
def test_compiling_generate_stores_row_major_and_a_held_step_pins_the_layout():
    """compile=True stores the matrices row-major before tracing (Inductor's products run faster
    on them: ref-8e-top2 644 against 519 tokens/s); while the model holds the compiled step an
    eager call leaves them there (moving them would trace again); once released, eager moves them."""
    model = make_model(**FEATURES).eval()
    ids = random_ids(batch=1, seq=4)
    eager = model.generate(ids, 3, greedy=True)
    weights = decode_layout_weights(model)
    assert all(is_column_major(w) for w in weights)
    assert torch.equal(model.generate(ids, 3, greedy=True, compile=True), eager)
    assert all(w.is_contiguous() for w in weights)
    assert torch.equal(model.generate(ids, 3, greedy=True), eager)
    assert all(w.is_contiguous() for w in weights)
    model.release_decode_cache()
    model.generate(ids, 3, greedy=True)
    assert all(is_column_major(w) for w in weights)
    model.decode_layout = False  # the user's choice: no call moves them
    use_row_major_layout(model)
    assert torch.equal(model.generate(ids, 3, greedy=True), eager)
    assert all(w.is_contiguous() for w in weights)


@pytest.mark.slow  # torch.compile
def test_bench_generate_times_each_mode_in_its_own_layout(tmp_path):
    """`moelab bench generate --compile` times eager decoding on column-major weights and the
    compiled step on its own row-major copy, as a user would get each (one model for both would
    pin it row-major, see above), and both decode transformers' tokens."""
    from moelab.bench.generate import GenerateOptions, measure_model

    model = make_model(**FEATURES).eval()
    save_pretrained(model, tmp_path / "m")
    model = load_pretrained(tmp_path / "m").eval()
    options = GenerateOptions(batch_sizes=(1,), prompt_tokens=4, new_tokens=3, rounds=1, compile=True)
    (row,) = measure_model("m", tmp_path / "m", model, options)
    assert set(row["same_greedy_tokens"]) == {"moelab", "transformers", "moelab_compiled"}
    assert all(same == 1.0 for same in row["same_greedy_tokens"].values())
    assert all(is_column_major(w) for w in decode_layout_weights(model))


def test_bf16_matrices_are_column_major_for_batch_1_and_row_major_for_larger_batches():
    """bf16 one-row products run as `embedding_bag` over column-major weights; several rows run
    torch's products, slower on column-major bf16 matrices: generate lays bf16 matrices out for
    its batch size, and float32 ones column-major at every batch size."""
    model = make_model(**FEATURES).eval().to(torch.bfloat16)
    weights = decode_layout_weights(model)
    assert weights and all(w.dtype == torch.bfloat16 for w in weights)
    assert decode_layout_weights(model, batch=2) == []
    for batch, column_major in [(1, True), (2, False), (1, True)]:
        model.generate(random_ids(batch=batch, seq=4), 2, greedy=True)
        assert all(is_column_major(w) if column_major else w.is_contiguous() for w in weights), batch
    assert use_decode_layout(model, batch=3) > 0 and use_decode_layout(model, batch=3) == 0


def test_a_cast_or_a_move_stores_the_moved_matrices_row_major_again():
    """After `.to(fp16)` (or a move off the CPU) nothing stays column-major: the layout is for CPU
    float32 and bf16 products only; a move that keeps them CPU float32 or bf16 keeps it."""
    model = make_model(**FEATURES).eval()
    model.generate(random_ids(batch=1, seq=4), 2, greedy=True)
    weights = decode_layout_weights(model)
    model.to(torch.float32)  # nothing changes
    assert all(is_column_major(w) for w in weights)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    model.to(torch.bfloat16)
    assert all(is_column_major(w) for w in weights)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name].to(torch.bfloat16)), name
    model.to(torch.float16)
    assert all(p.is_contiguous() for p in model.parameters())
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name].to(torch.bfloat16).to(t.dtype)), name
    assert model.lm_head.weight is model.embed.weight


def test_attention_projections_are_stored_side_by_side_and_multiplied_once():
    """use_decode_layout stores each attention block's q, k and v projections as adjacent column
    blocks of one column-major matrix (their values and Parameters unchanged), which the block
    multiplies once when no gradient flows: the same logits as the float64 model, in float32 and
    (one row, through embedding_bag) bf16; training multiplies them one by one; storing them
    row-major again gives each its own storage."""
    model = make_model(**FEATURES).eval()
    reference = copy.deepcopy(model).to(F64)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    use_decode_layout(model)
    attn = model.layers[0].attn
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    with torch.no_grad():
        assert torch.equal(attn._qkv_weight(), torch.cat(weights))
    assert attn._qkv_weight() is None  # a gradient would flow: stored apart again, three products
    assert side_by_side(weights) is None
    use_decode_layout(model)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    ids = random_ids(batch=2, seq=5)
    with torch.inference_mode():
        assert_close(model.decode_step(ids), reference.decode_step(ids), what="float32 logits")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    use_decode_layout(bf16, batch=1)
    with torch.inference_mode():
        assert bf16.layers[1].attn._qkv_weight() is not None
        logits = bf16.decode_step(ids[:1])
    assert_close(logits.double(), reference.decode_step(ids[:1]), atol=0.1, rtol=0.05, what="bf16 logits")
    use_row_major_layout(model)
    assert len({w.data_ptr() for w in weights}) == 3 and all(w.is_contiguous() for w in weights)
    with torch.no_grad():
        assert attn._qkv_weight() is None


def test_side_by_side_finds_only_adjacent_blocks_in_order():
    columns = torch.randn(6, 9)  # [in, 4 + 3 + 2 outputs], row-major: a column-major [9, 6] matrix
    a, b, c = columns[:, :4].mT, columns[:, 4:7].mT, columns[:, 7:].mT
    assert torch.equal(side_by_side([a, b, c]), columns.mT)
    assert side_by_side([a, c, b]) is None and side_by_side([b, c]) is None  # out of order, or a gap before
    assert side_by_side([a, b]) is None  # its own columns are 7 of 9 wide, not 7
    assert side_by_side([a, b, c.clone()]) is None  # a block with storage of its own
    assert side_by_side([a.contiguous(), b, c]) is None
    assert side_by_side([a, b, columns[:5, 7:].mT]) is None  # adjacent, but 5 columns wide, not 6
    assert side_by_side([a, b, c.view(torch.int32)]) is None  # adjacent bytes of another dtype
    alone = [torch.randn(6, 3).mT, torch.randn(6, 2).mT]  # column-major, each in its own storage
    assert store_apart(alone) == 0 and all(is_column_major(w) for w in alone)  # only blocks side by side move
    assert store_apart([a, b, c]) == 3 and all(w.is_contiguous() for w in (a, b, c))


def test_side_by_side_needs_every_block_inside_the_first_ones_storage():
    """Blocks that start where the previous one ends but lie in another storage (here two tensors
    over one numpy buffer) are not one matrix: the first's storage does not hold them all."""
    buffer = np.arange(24, dtype=np.float32)
    first, second = torch.from_numpy(buffer[:10]), torch.from_numpy(buffer[2:12])  # storages of 40 bytes
    a, b = first.as_strided((2, 3), (1, 4)), second.as_strided((2, 3), (1, 4))  # columns of a [4, 3] matrix
    assert b.data_ptr() == a.data_ptr() + 2 * 4 and a.untyped_storage().nbytes() == 40
    assert side_by_side([a, b]) is None  # the [4, 3] matrix would need 48 bytes of a's storage
    whole = torch.from_numpy(buffer[:12]).as_strided((4, 3), (1, 4))
    assert torch.equal(side_by_side([whole[:2], whole[2:]]), whole)


def test_only_projections_of_one_dtype_go_side_by_side():
    """A block whose key projection is bf16 and the others float32 (all moved at batch 1) keeps
    each projection's dtype and values: stored column-major one by one, not side by side."""
    model = make_model(**FEATURES).eval()
    attn = model.layers[0].attn
    attn.k_proj.to(torch.bfloat16)
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    before = [w.clone() for w in weights]
    use_decode_layout(model, batch=1)
    assert [w.dtype for w in weights] == [torch.float32, torch.bfloat16, torch.float32]
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    assert all(is_column_major(w) for w in weights) and side_by_side(weights) is None


@pytest.mark.parametrize(
    "when, compiled",
    [("between_steps", False), ("after_backward", False),
     pytest.param("between_steps", True, marks=pytest.mark.slow)],
)  # fmt: skip
def test_a_fused_optimizer_steps_a_model_that_decodes_between_steps_as_one_that_does_not(when, compiled):
    """torch's fused optimizers step a weight, its gradient and its state as flat blocks: decoding
    between steps (the optimizer's state made) moves the weights, and the next training forward
    (compiled too) stores them row-major again; decoding between a backward and its step moves
    nothing. Either way `Adam(fused=True)` steps the model as one that never decoded."""
    model = make_model(**FEATURES)
    reference = copy.deepcopy(model)
    ids = random_ids(batch=2, seq=6)
    attn = model.layers[0].attn
    projections = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    for m in (model, reference):
        optimizer = torch.optim.Adam(m.parameters(), lr=0.05, fused=True)
        for step in range(3):
            optimizer.zero_grad()
            if m is model and when == "between_steps" and step > 0:
                m.eval().generate(ids, 2, greedy=True)
                assert side_by_side(projections) is not None and not model.lm_head.weight.is_contiguous()
            forward = torch.compile(m.train()) if compiled else m.train()
            forward(ids, ids).loss.backward()
            if m is model and when == "after_backward":
                m.eval().generate(ids, 2, greedy=True)
                assert all(p.is_contiguous() for p in m.parameters())  # nothing with a gradient moved
            optimizer.step()
    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=1e-6, msg=name)


def test_a_model_that_decoded_under_torch_distributed_trains_under_ddp_as_one_that_did_not(tmp_path):
    """DDP records the weights' layout when it wraps a model: where torch.distributed is initialised,
    generate stores them row-major again before it returns, so DDP (its default gradient copies)
    gives the gradients of a model that never decoded (before: up to 0.58 off)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_model(**FEATURES)
        reference = copy.deepcopy(model)
        ids = random_ids(batch=2, seq=6)
        model.eval().generate(ids, 2, greedy=True)
        assert not model.decode_layout_in_use and all(p.is_contiguous() for p in model.parameters())
        wrapped = DistributedDataParallel(model.train())
        wrapped(ids, ids).loss.backward()
        reference.train()(ids, ids).loss.backward()
        expected = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name].grad, atol=1e-6, rtol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_projections_with_hooks_biases_or_parametrizations_are_multiplied_one_by_one():
    """Only plain projections go side by side and into one product: a hook on one still fires
    at every decode step, a bias is added, a parametrized weight is used; each decodes the tokens
    of the same model kept row-major."""
    model = make_model(**FEATURES, n_layers=4).eval()
    calls = []
    model.layers[0].attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        k_proj = model.layers[1].attn.k_proj
        k_proj.bias = torch.nn.Parameter(torch.randn(k_proj.out_features))
    torch.nn.utils.parametrizations.weight_norm(model.layers[2].attn.v_proj)
    reference = copy.deepcopy(model)
    reference.decode_layout = False
    ids = random_ids(batch=1, seq=4)
    tokens_ = model.generate(ids, 5, greedy=True)
    assert len(calls) == 5  # the prompt and 4 one-token steps
    assert torch.equal(tokens_, reference.generate(ids, 5, greedy=True))
    sides = [[a.q_proj.weight, a.k_proj.weight, a.v_proj.weight] for a in (b.attn for b in model.layers[:2])]
    assert all(side_by_side(weights) is None for weights in sides)
    assert side_by_side([model.layers[3].attn.q_proj.weight, model.layers[3].attn.k_proj.weight,
                         model.layers[3].attn.v_proj.weight]) is not None  # fmt: skip
