"""Run a checkpoint one decoder layer at a time, whatever its size.

Shape legend: B sequences, S tokens each, D model dim.

    runner = LayerwiseModel("path/to/checkpoint")     # the model's skeleton: no weights in memory
    states = runner.embed(batches)                    # per batch [B, S] of ids: the states entering layer 0
    for i in range(runner.num_layers):
        with runner.layer(i) as run:                  # layer i's weights, read from disk
            states = [run(b, h) for b, h in enumerate(states)]

A checkpoint with a multi-token prediction layer (DeepSeek-V3, GLM-4.5, Qwen3-Next: `moelab.hf.mtp`,
`runner.mtp_layers`) runs it after the decoder layers, on what its drafter sees (`mtp_states`):

    states = runner.mtp_states(batches, states)       # [B, S - 1, D]: final states and next tokens
    with runner.layer(runner.mtp_layers[0]) as run:
        states = [run(b, h) for b, h in enumerate(states)]

Inkling 2 Loop runs some of its layers several times a forward pass (`Loop`): `runner.schedule`
lists the layer each step runs, in transformers' order, and each step is run with its number:

    for step, i in enumerate(runner.schedule):       # range(num_layers) for every other model
        with runner.layer(i, step=step) as run:
            states = [run(b, h) for b, h in enumerate(states)]

The skeleton is the model's own class (transformers' for its checkpoints, moelab's for its own)
built on the meta device; only the tensors it computes itself (rotary tables) are real. The
embedding is read for `embed` and dropped again; `layer(i)` reads decoder layer i's tensors by
their names on disk and frees them when the block ends. Every MoE block runs as a moelab
`MoELayer` built from the checkpoint view (`moe_layer_from_view`: the same computation as the
family's own block, tested against each of them), so routed experts are read through the view's
one layout and never need a family's in-memory format; `run_moe` lets a caller compute the block
itself (the calibration pass observes it this way). Peak memory: one decoder layer in `dtype`
plus the hidden states.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.hf.adapters import NATIVE, resolve
from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.hf.modules import MoEModules, beside_language_model, decoder_layers, find_moe_modules
from moelab.hf.mtp import MTPModule
from moelab.hf.native import moe_layer_from_view
from moelab.hf.stored_names import read_merged
from moelab.hf.view import ModelView, MoELayerView
from moelab.memory import release_freed_memory
from moelab.nn.moe import MoELayer, MoEResult, router_inputs
from moelab.validation import non_finite_names

RunMoE = Callable[..., Tensor]
"""run_moe(moe, x [..., D], context=...) -> y: how a run computes an MoE block; context: what its
router reads besides x (`token_context`)."""


def token_context(moe: MoELayer, kwargs: dict) -> dict[str, Tensor] | None:
    """What moelab's layer `moe` needs from the keyword arguments transformers' decoder layer hands
    its MoE block: the token ids, for a hash router (transformers' DeepSeek-V4 hands them as `input_ids`,
    moelab's own blocks in their `context`); else None."""
    if not moe.router.reads_token_ids:
        return None
    return {"input_ids": kwargs.get("input_ids", (kwargs.get("context") or {}).get("input_ids"))}


CARRIED = "prev_topk_indices"  # GLM-5's DSA: a "shared" layer reuses the top-k of the full layer before it
ROUTER_STATES = "prev_router_hidden_states"  # ZAYA: each layer's router reads the state of the one before
ROUTER_STATES_INPUT = "router_states"  # ... which moelab's MLPRouter reads from its layer's context
BLOCK_STATES = "block_states"  # Inkling 2: each layer attends over the inputs of earlier blocks of layers
LOOP_MESSAGES = "messages"  # Inkling 2 Loop: a looped layer's later passes read the pass before's
HANDED_ON = (CARRIED, ROUTER_STATES)  # a layer returns (hidden, the value the next layer reads)
DIFFERENTIABLE = (BLOCK_STATES, ROUTER_STATES)  # carried values the backward run carries gradients through


@dataclasses.dataclass(frozen=True)
class Loop:
    """Inkling 2 Loop's looped decoder layers [start, end), run `passes` times a forward pass: each pass
    after the first restarts from the states (hidden and block_states) that entered the loop and reads
    messages computed from the pass before's output and the block states it appended (the model's
    message_input; transformers' Inkling2LoopTextModel.forward)."""

    start: int
    end: int
    passes: int

    def schedule(self, num_layers: int) -> list[int]:
        """The layer each step of a forward pass runs: those before the loop, the loop's `passes` times,
        those after it."""
        looped = list(range(self.start, self.end))
        return [*range(self.start), *looped * self.passes, *range(self.end, num_layers)]


def looped_layers(layers: nn.ModuleList, config) -> Loop | None:
    """The model's loop, where its decoder layers read messages (Inkling 2 Loop) and run more than once
    a forward pass; else None (a single pass reads no messages: each layer runs once)."""
    if not any(LOOP_MESSAGES in _parameters(layer) for layer in layers):
        return None
    text = config.get_text_config()
    if text.loop_num_passes == 1:
        return None
    return Loop(text.loop_layer_index_start, text.loop_layer_index_end, text.loop_num_passes)


class _Stop(Exception):
    """Raised by the last decoder layer's stand-in: everything after the layers is not needed."""


class LayerwiseModel:
    """A checkpoint directory run layer by layer (see the module docstring).

    view: its checkpoint view; num_layers: decoder layers; moe_layers: the indices of those with
    routed experts; mtp_layers: the multi-token prediction layer's index past them, if the
    checkpoint stores one with routed experts (`Family.mtp_layers`; none for a chain of several).
    dtype: the dtype layers compute in (tensors are cast as they are read). carried: the name of
    what a decoder layer reads besides the hidden states and the recorded inputs, None for most
    families: GLM-5's DSA top-k (CARRIED) or ZAYA's router states [B, S, R] (ROUTER_STATES), which
    a layer hands the next one, or Inkling 2's
    block_states [B, S, K, D] (BLOCK_STATES), the inputs of the K block-boundary layers run so far,
    which the run appends to (transformers' model loop does) and the final norm reads through the
    model's final_input; carry: per batch, the value of it the next layer run reads (calibration
    saves it with the hidden states: `carry_read_by`, `carry_taped_by`); carry_grad: per batch, for
    block_states, the gradient of the loss with respect to them gathered so far by the backward run,
    for router states with respect to those the next layer to run backward hands on
    (`head_gradients`, `layer_backward`). loop: Inkling 2 Loop's looped layers (`Loop`), else None
    (also for a single pass); schedule: the layer each step of a forward pass runs (the layers in
    order, a loop's once a pass).
    """

    def __init__(self, path: str | Path, *, dtype: torch.dtype = torch.float32):
        config, self._ckpt, self.family = resolve(path)
        self.path = Path(path)
        self.dtype = dtype
        self.num_layers = self.family.layer_count(config)
        self.view = ModelView(self._ckpt, config, self.family, self.num_layers)
        self.model = skeleton(self.path, config, self.family, dtype)
        self._float32 = float32_names(self.model, dtype)
        self._layers_name, self._layers = decoder_layers(self.model, self.num_layers)
        self._stored_as = tied_names(self.model, self._ckpt, self.family.stored_renames)
        expected = self.family.layer_prefix.format(n=0)  # a vision-language skeleton holds it as stored
        first = f"{self._layers_name}.0."
        renamed = any(m.startswith(first) and d.startswith(expected) for m, d in self.family.stored_renames)
        if expected not in (first, _as_stored(first, self.family.stored_renames)) and not renamed:
            raise CheckpointError(
                f"{self.path}: the model's decoder layers are named {self._layers_name}.N in memory but "
                f"{expected.replace('0', 'N')} on disk; this family cannot be run layer by layer"
            )
        # what a decoder layer reads that an earlier layer makes besides the hidden states (GLM-5's DSA
        # top-k, Inkling 2's block_states, ZAYA's router states)
        parameters = _parameters(self._layers[0])
        self.carried: str | None = next(
            (name for name in (CARRIED, BLOCK_STATES, ROUTER_STATES) if name in parameters), None
        )
        self.carry: list[Tensor | None] = []  # per batch: the carried value the next layer run reads
        self.carry_grad: list[Tensor | None] = []  # per batch: d loss / d block_states or router states
        self.loop = looped_layers(self._layers, self.model.config)
        # the layer each step of a forward pass runs, in transformers' order: a looped layer once a pass
        self.schedule = list(range(self.num_layers)) if self.loop is None else self.loop.schedule(self.num_layers)
        self._passes: list[dict[str, tuple[Tensor, Tensor]]] = []  # per batch: the loop's states (`_enter_loop`)
        self.moe_layers = self.family.moe_layers(self._ckpt, config)
        # moelab runs one MTP layer, not a chain of them: a checkpoint storing
        # several runs its decoder layers alone (compress refuses to prune such layers, and drops them)
        stored = [] if self.family is NATIVE else self.view.mtp_layers
        self.mtp_layers = stored if len(stored) == 1 else []
        self._mtp_refused: str | None = None  # why the MTP layer cannot be run (`check_mtp`), if it cannot
        self._mtp_modules = {index: self._mtp_module(index) for index in self.mtp_layers}
        self._calls: list[
            list[tuple[tuple, dict]]
        ] = []  # per batch, per layer: the inputs besides the hidden states
        self._mtp_calls: list[tuple[tuple, dict]] = []  # per batch: the MTP layer's (`mtp_states`)

    def embed(self, batches: Sequence[Tensor]) -> list[Tensor]:
        """The hidden states entering layer 0, one [B, S, D] per batch of ids [B, S]; also
        records every layer's other inputs (masks, rotary tables) for `layer`."""
        recorded: list[tuple[Tensor, list[tuple[tuple, dict]]]] = []
        with self._outside_layers(), self._stand_ins(recorded):
            for ids in batches:
                try:
                    with torch.no_grad():
                        if self.family is NATIVE:
                            self.model(ids)
                        else:
                            self.model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
        self._calls = [calls for _, calls in recorded]
        self.carry = [self._no_blocks(hidden) for hidden, _ in recorded]
        self.carry_grad = [None] * len(recorded)
        self._passes = [{} for _ in recorded]
        return [hidden for hidden, _ in recorded]

    def _no_blocks(self, hidden: Tensor) -> Tensor | None:
        """What layer 0 is handed: for block_states, none yet [B, S, 0, D]; else nothing."""
        return hidden.new_zeros(*hidden.shape[:-1], 0, hidden.shape[-1]) if self.carried == BLOCK_STATES else None

    @contextlib.contextmanager
    def layer(
        self, index: int, *, run_moe: RunMoE | None = None, step: int | None = None
    ) -> Iterator[Callable[[int, Tensor], Tensor]]:
        """Decoder layer `index` with its weights: yields run(batch number, hidden [B, S, D]) ->
        the layer's output [B, S, D]. run_moe(moe, x [..., D], context=...) -> y computes its MoE block
        (default: the MoELayer itself); it gets the routed experts in their stored dtype (the
        grouped kernels cast one expert at a time), so a layer never holds a second copy. Where
        layers hand a value on (`carried`), run reads carry[batch] and leaves the next layer's there
        (the layer's own, or block_states with a block-boundary layer's input appended): run the
        layers in order. step: where in `schedule` the layer runs (default: `index`, where each
        layer runs once); hidden is the output of the step before, which a looped layer's later
        passes read messages from (`Loop`): run the steps in order."""
        step = self._step(index, step)
        with self._loaded(index, run_moe, cast_experts=run_moe is None) as module:

            def run(batch: int, hidden: Tensor) -> Tensor:
                hidden, messages = self._enter_loop(batch, index, step, hidden)
                with torch.no_grad():
                    kwargs = self._kwargs(batch, index, step) | messages
                    out = module(hidden, *self._inputs(batch, index, step)[0], **kwargs)
                if step in self._loop_steps[-1:]:  # the loop is done: what it held is not read again
                    self._passes[batch].clear()
                if self.carried in HANDED_ON and index not in self._mtp_modules:
                    self.carry[batch] = out[1]
                if self.carried == BLOCK_STATES and module.is_block_boundary:
                    self.carry[batch] = torch.cat([self.carry[batch], hidden.unsqueeze(-2)], dim=-2)
                return out[0] if isinstance(out, tuple) else out

            yield run

    @contextlib.contextmanager
    def layer_backward(
        self, index: int, *, run_moe: RunMoE | None = None
    ) -> Iterator[Callable[[int, Tensor, Tensor], Tensor]]:
        """Decoder layer `index` for the backward sweep: yields vjp(batch number, hidden [B, S, D],
        grad_out [B, S, D]) -> grad_in [B, S, D], the gradient with respect to the layer's input
        given the one with respect to its output (the layer is recomputed under autograd; its
        weights, the experts cast to `dtype`, need no gradient; it reads carry[batch] as the value
        the layer before handed it). For block_states, grad_out is the gradient through the layers
        above alone: the layer's gradient with respect to its block_states is added to
        carry_grad[batch], and a block-boundary layer's input also gets what carry_grad holds for
        its slot (what the layers above and the final input read of it). For ZAYA's router states,
        carry_grad[batch] holds the gradient with respect to the state the layer hands on (None:
        nothing above reads it) and is replaced by that with respect to the state it read (None for
        the first layer, which reads none). Run the layers from the top down, after `head_gradients`."""
        self.check_backward()
        with self._loaded(index, run_moe, cast_experts=True) as module:

            def vjp(batch: int, hidden: Tensor, grad_out: Tensor) -> Tensor:
                kwargs = self._kwargs(batch, index)
                with torch.enable_grad():
                    inputs = [hidden.detach().requires_grad_(True)]
                    if self.carried in DIFFERENTIABLE and kwargs[self.carried] is not None:
                        inputs.append(kwargs[self.carried].detach().requires_grad_(True))
                        kwargs[self.carried] = inputs[1]
                    out = module(inputs[0], *self._inputs(batch, index)[0], **kwargs)
                    outs, grads_out = [out[0] if isinstance(out, tuple) else out], [grad_out]
                    if self.carried == ROUTER_STATES and self.carry_grad[batch] is not None:
                        outs.append(out[1])  # what the layers above read of the state it hands on
                        grads_out.append(self.carry_grad[batch])
                    grads = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True, materialize_grads=True)
                if self.carried == BLOCK_STATES:
                    return self._through_block_states(batch, index, module.is_block_boundary, *grads)
                if self.carried == ROUTER_STATES:  # the first layer reads none
                    self.carry_grad[batch] = grads[1] if len(grads) > 1 else None
                return grads[0]

            yield vjp

    def _through_block_states(
        self, batch: int, index: int, boundary: bool, grad: Tensor, grad_blocks: Tensor
    ) -> Tensor:
        """Layer `index`'s input gradient grad [B, S, D] plus, at a block boundary, what carry_grad[batch]
        holds for the slot of its input; grad_blocks [B, S, K, D], its gradient with respect to the
        block_states it read, added to carry_grad[batch], whose slots past K are then done."""
        gathered, slots = self.carry_grad[batch], grad_blocks.shape[-2]
        if gathered is None or gathered.shape[-2] != slots + boundary:
            raise RuntimeError(
                f"layer {index} reads {slots} block states, but the backward run holds the gradients of "
                f"{None if gathered is None else gathered.shape[-2]}: call head_gradients() first and run the "
                "layers from the top down"
            )
        gathered = gathered[..., :slots, :] + grad_blocks
        if boundary:
            grad = grad + self.carry_grad[batch][..., slots, :]
        self.carry_grad[batch] = gathered
        return grad

    def head_gradients(
        self, batches: Sequence[Tensor], states: Sequence[Tensor], scale: float
    ) -> list[Tensor]:
        """The gradient of `scale` x the summed next-token cross-entropy of each batch of ids
        [B, S] with respect to the last decoder layer's output states [B, S, D], computed by the
        model's own final norm and output head (one sequence at a time). For block_states, the
        head reads carry[batch] through the model's final_input, and carry_grad[batch] is set to
        the loss's gradient with respect to them."""
        self.check_backward()
        feed: list[Tensor] = []

        def logits(ids: Tensor, *inputs: Tensor) -> Tensor:
            feed[:] = inputs
            out = self.model(ids) if self.family is NATIVE else self.model(input_ids=ids, use_cache=False)
            return out.logits[0, :-1]

        blocks = self.carried == BLOCK_STATES
        inputs = [(h, self.carry[b]) if blocks else (h,) for b, h in enumerate(states)]
        with self._outside_layers(head=True), self._stand_ins([], feed=feed), self._final_input_reads(feed):
            grads = _loss_gradients(batches, inputs, logits, scale, shift=1)
        if blocks:
            self.carry_grad = [grad[1] for grad in grads]
        elif self.carried == ROUTER_STATES:  # nothing reads the last layer's router states
            self.carry_grad = [None] * len(grads)
        return [grad[0] for grad in grads]

    @contextlib.contextmanager
    def _final_input_reads(self, feed: list[Tensor]):
        """For block_states, the model's final_input reads feed[1] as them (the model loop's own are
        built from the stand-ins' pass-through states); else nothing."""
        if self.carried != BLOCK_STATES:
            yield
            return
        hook = self._base_model().final_input.register_forward_pre_hook(lambda module, args: (feed[1], *args[1:]))
        try:
            yield
        finally:
            hook.remove()

    def mtp_states(self, batches: Sequence[Tensor], states: Sequence[Tensor]) -> list[Tensor]:
        """The states entering the multi-token prediction layer, one [B, S - 1, D] per batch of
        ids [B, S] and of the last decoder layer's outputs [B, S, D]: at position i,
        proj([embed_norm(embed(ids[i + 1])); hidden_norm(h_i)]) (`moelab.hf.mtp`), h the final
        norm of the model's states (what vLLM's and SGLang's drafters are handed), the embedding
        zeroed at position 0 where vLLM's drafter zeroes it; the norms are the family's own
        (Qwen3-Next's scale by 1 + weight). Also records the layer's other inputs (rotary tables,
        masks) at length S - 1."""
        self.check_mtp()
        module = self._mtp_module_keys()
        embed_norm, hidden_norm, proj = map(self._mtp_tensor, (module.embed_norm, module.hidden_norm, module.proj))
        recorded: list = []
        feed: list[Tensor] = []
        self._mtp_calls = []
        out = []
        with self._outside_layers(), self._stand_ins(recorded, feed=feed), torch.no_grad():
            norm = self._final_norm()
            embedding = self.model.get_input_embeddings().weight
            if module.embedding is not None:  # DeepSeek-V3 stores a copy of its own
                embedding = self._mtp_tensor(module.embedding)
            for ids, final in zip(batches, states):
                feed[:] = [final[:, :-1]]
                h = self.model.base_model(input_ids=ids[:, :-1], use_cache=False).last_hidden_state
                self._mtp_calls.append(recorded[-1][1][self._mtp_inputs_from])  # at length S - 1
                embeds = torch.nn.functional.embedding(ids[:, 1:], embedding)
                if module.zero_first:
                    embeds[:, 0] = 0
                both = torch.cat([_normed(norm, embeds, embed_norm), _normed(norm, h, hidden_norm)], dim=-1)
                out.append(torch.nn.functional.linear(both, proj))
        return out

    def mtp_head_gradients(
        self, batches: Sequence[Tensor], states: Sequence[Tensor], scale: float
    ) -> list[Tensor]:
        """The gradient of `scale` x the summed cross-entropy of the multi-token prediction
        layer's drafts with respect to its output states [B, S - 1, D] (`mtp_states` for ids
        [B, S]): position i predicts ids[i + 2] through the module's final norm and its output
        head (the model's where it stores none)."""
        module = self._mtp_module_keys()
        weight = self._mtp_tensor(module.final_norm)
        head = self._mtp_tensor(module.head or self._head_key())
        norm = self._final_norm()

        def logits(ids: Tensor, h: Tensor) -> Tensor:
            return torch.nn.functional.linear(_normed(norm, h, weight), head)[0, :-1]

        return [grad for (grad,) in _loss_gradients(batches, [(h,) for h in states], logits, scale, shift=2)]

    def check_backward(self) -> None:
        """Refuse (CheckpointError) a backward run moelab cannot do, before it runs: through a loop, whose
        later passes read the states that entered it and messages from the pass before, which the
        backward run does not carry gradients through."""
        if self.loop is not None:
            raise CheckpointError(
                f"{self.path}: Inkling 2 Loop runs its looped decoder layers ({self.loop.start}..{self.loop.end - 1}) "
                f"{self.loop.passes} times a forward pass, and moelab's backward sweep does not carry gradients "
                "through the passes: the statistics it gathers (neurons: HEAPr, moelab's recipe) are not computed "
                "for it; compress with another method, or moelab's recipe with its expert path (--option strategy=experts)"
            )

    def check_mtp(self) -> None:
        """Refuse (CheckpointError) a multi-token prediction layer moelab cannot run, before it runs."""
        if self._mtp_refused is not None:
            raise CheckpointError(self._mtp_refused)

    def _step(self, index: int, step: int | None) -> int:
        """Where in `schedule` layer `index` runs: `step`, checked, or `index` where it runs once."""
        if index in self._mtp_modules:
            return index
        if step is None and self.schedule.count(index) == 1:
            return self.schedule.index(index)
        if step is None or not 0 <= step < len(self.schedule) or self.schedule[step] != index:
            runs = [s for s, i in enumerate(self.schedule) if i == index]
            raise ValueError(f"layer {index} runs at steps {runs} of a forward pass, not at {step}: give one as step")
        return step

    def pass_number(self, step: int) -> int:
        """Which pass of its layer step `step` runs (0 but for a looped layer's later passes)."""
        return self.schedule[:step].count(self.schedule[step])

    def passes(self, index: int) -> int:
        """How many times a forward pass runs layer `index`."""
        return self.schedule.count(index) if index < self.num_layers else 1

    def resumable_after(self, step: int) -> bool:
        """Whether the states after step `step` (the hidden states, `carry_read_by` the next layer) are
        all the run after it needs: not between two steps of the loop (`Loop`), whose later passes also
        read the states that entered it and what the pass before made."""
        return step not in self._loop_steps[:-1]

    @property
    def _loop_steps(self) -> range:
        """The steps of `schedule` that run the loop's layers (none without one)."""
        if self.loop is None:
            return range(0)
        return range(self.loop.start, self.loop.start + (self.loop.end - self.loop.start) * self.loop.passes)

    def _enter_loop(self, batch: int, index: int, step: int, hidden: Tensor) -> tuple[Tensor, dict]:
        """(the hidden states layer `index` reads at step `step`, {messages: [B, S, 4, D]} for a looped
        layer's later passes, else {}), given `hidden`, the output of the step before. A loop's first
        layer keeps, on its first pass, the states entering the loop, and on the later ones restarts from
        them (carry[batch] too), keeping the output of the pass before and the block states it appended
        past its first one as what the messages are computed from (transformers' model loop)."""
        if self.loop is None or not self.loop.start <= index < self.loop.end:
            return hidden, {}
        number, held = self.pass_number(step), self._passes[batch]
        if index == self.loop.start and number == 0:
            held.clear()
            held["entering"] = (hidden, self.carry[batch])
        elif index == self.loop.start:
            entering, blocks = held["entering"]
            held["before"] = (hidden, self.carry[batch][..., blocks.shape[-2] + 1 :, :])
            hidden, self.carry[batch] = entering, blocks
        if number == 0:
            return hidden, {}
        if "before" not in held:
            raise RuntimeError(f"step {step} runs pass {number} of layer {index}: run the steps in order")
        before, appended = held["before"]
        with torch.no_grad():
            messages = self._base_model().message_input(appended, before, index - self.loop.start)
        return hidden, {LOOP_MESSAGES: messages}

    def _kwargs(self, batch: int, index: int, step: int | None = None) -> dict:
        """Layer `index`'s keyword inputs for batch `batch` at `step` (default: `index`), the carried
        value included."""
        kwargs = self._inputs(batch, index, step)[1]
        if self.carried is None:
            return kwargs
        if self.carried == BLOCK_STATES and (held := self.carry[batch].shape[-2]) != (reads := self._blocks_below(index)):
            raise RuntimeError(
                f"layer {index} reads the inputs of the {reads} block-boundary layers below it, but the run holds "
                f"{held}: run the layers in order, each once a batch"
            )
        return {**kwargs, self.carried: None if index in self._mtp_modules else self.carry[batch]}

    def _blocks_below(self, index: int) -> int:
        """How many block-boundary layers run before layer `index`: the block states it reads (Inkling 2)."""
        return sum(layer.is_block_boundary for layer in self._layers[:index])

    def _inputs(self, batch: int, index: int, step: int | None = None) -> tuple[tuple, dict]:
        """Layer `index`'s inputs besides the hidden states for batch `batch`, where it runs at `step`
        of `schedule` (default: `index`)."""
        if index in self._mtp_modules:
            if not self._mtp_calls:
                raise RuntimeError("call mtp_states() first: the MTP layer's inputs are recorded there")
            return self._mtp_calls[batch]
        return self._calls[batch][index if step is None else step]

    def _mtp_module_keys(self) -> MTPModule:
        (module,) = self.family.mtp
        if missing := [name for name in module.names if name not in self._ckpt]:
            raise CheckpointError(
                f"{self.path}: the multi-token prediction layer {module.index} has no {', '.join(missing)}; "
                "it cannot be run (compress with --mtp drop to leave it out)"
            )
        return module

    def _mtp_module(self, index: int) -> nn.Module:
        """The multi-token prediction layer's decoder layer: the family's own class, numbered
        `index`, on the meta device; where the config lists a setting per layer (layer_types,
        mlp_layer_types, ...), layer `index` gets that of the layer whose inputs it takes (the last
        full-attention one)."""
        config = copy.deepcopy(self.model.config.get_text_config())
        like = self._mtp_inputs_from
        for name, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == self.num_layers:
                setattr(config, name, value + [value[like]] * (index + 1 - len(value)))
        if self.carried == CARRIED:  # GLM-5: the MTP layer runs its own DSA indexer (no earlier layer at its length)
            if not any(key.startswith(self.family.prefix(index) + "self_attn.indexer.") for key in self._ckpt.keys()):
                # refused when the layer is run, not here: a run that leaves it out (--mtp drop, --no-mtp) works
                self._mtp_refused = (
                    f"{self.path}: the multi-token prediction layer {index} stores no DSA indexer of its own, and "
                    "moelab does not hand it another layer's top-k; compress with --mtp drop (calibrate --no-mtp) "
                    "to leave it out"
                )
            config.indexer_types[index] = "full"
        if (getattr(config, "hc_mult", None) or 1) > 1:  # GLM-5-Next: hyper-connections
            self._mtp_refused = (
                f"{self.path}: the multi-token prediction layer {index} is a decoder layer with hyper-connections "
                f"(hc_mult {config.hc_mult} residual streams), and moelab's drafter feeds it one stream; compress "
                "with --mtp drop (calibrate --no-mtp) to leave it out"
            )
        with torch.device("meta"):
            return type(self._layers[-1])(config, index).eval()

    @property
    def _mtp_inputs_from(self) -> int:
        """The decoder layer whose other inputs (mask, rotary tables) the MTP layer takes: the last
        one, or the last full-attention one where the config lists layer types."""
        types = getattr(self.model.config.get_text_config(), "layer_types", None)
        if isinstance(types, list) and "full_attention" in types[: self.num_layers]:
            return max(i for i, kind in enumerate(types[: self.num_layers]) if kind == "full_attention")
        return self.num_layers - 1

    def _base_model(self) -> nn.Module:
        """The module that holds the decoder layers and the final norm: a vision-language skeleton's base
        model holds its language model (`get_decoder`), which holds them."""
        base = self.model.base_model
        return base if hasattr(base, "norm") or not hasattr(base, "get_decoder") else base.get_decoder()

    def _final_norm(self) -> nn.Module:
        base = self._base_model()
        norm = getattr(base, "norm", None)
        if not isinstance(norm, nn.Module):
            raise CheckpointError(
                f"{self.path}: moelab finds no final norm (`norm`) in {type(base).__name__}, whose "
                "kind the multi-token prediction layer's norms share; compress with --mtp drop to leave the layer out"
            )
        return norm

    def _mtp_tensor(self, key: str) -> Tensor:
        return self._ckpt.get(key).to(self.dtype)

    def _module_name(self, module: nn.Module) -> str:
        return next(name for name, m in self.model.named_modules() if m is module)

    def _head_key(self) -> str:
        """The stored key of the output head's weight (the embedding's where tied)."""
        head = self.model.get_output_embeddings()
        name = next(n for n, p in self.model.named_parameters(remove_duplicate=False) if p is head.weight)
        return stored_key(self._ckpt, self._stored_as.get(name, name), self.family.stored_renames)

    @contextlib.contextmanager
    def _loaded(self, index: int, run_moe: RunMoE | None, *, cast_experts: bool) -> Iterator[nn.Module]:
        """Decoder layer `index` with its weights read from disk and its MoE block swapped for
        moelab's; freed again at the end."""
        if not self._calls:
            raise RuntimeError("call embed() first: the layers' inputs are recorded there")
        if index in self._mtp_modules:
            self.check_mtp()
        module = self._mtp_modules[index] if index in self._mtp_modules else self._layers[index]
        prefix = self.family.prefix(index) if index in self._mtp_modules else f"{self._layers_name}.{index}."
        installed = self._swap_moe_block(index, module, run_moe, cast_experts)
        # a looped layer's later passes read messages through the model's message_input (`_enter_loop`)
        messages = self._base_model().message_input if self.loop and self.loop.start <= index < self.loop.end else None
        try:
            self._load(module, prefix, skip=installed[0] if installed else None)
            if messages is not None:
                self._load(messages, f"{self._module_name(messages)}.", skip=None)
            yield module
        finally:
            _to_meta(module)
            if messages is not None:
                _to_meta(messages)
            if installed is not None:
                installed[1]()
            release_freed_memory()

    def carry_read_by(self, index: int) -> list[Tensor | None]:
        """`carry` where layer `index` reads it, else nothing: what a snapshot of the states entering
        layer `index` must keep. GLM-5's "full" DSA layers compute their own top-k (their attention has
        an indexer) and ignore the one handed to them; its "shared" layers and a layer of unknown kind
        read it. Every layer reads block_states, and so does the final input after the last layer;
        every layer reads ZAYA's router states (the first one none)."""
        if self.carried == BLOCK_STATES and index <= self.num_layers:
            return self.carry
        if self.carried is None or index >= self.num_layers:
            return []
        attention = getattr(self._layers[index], "self_attn", None)
        return [] if getattr(attention, "indexer", None) is not None else self.carry

    def carry_taped_by(self, index: int) -> list[Tensor | None]:
        """What the backward sweep's tape of the states entering layer `index` keeps of `carry`: what the
        layer reads (`carry_read_by`), but block_states only with the final input's (index = num_layers):
        every layer's are a prefix of those (`carry_from_tapes`), so the tapes hold them once."""
        if self.carried == BLOCK_STATES and index < self.num_layers:
            return []
        return self.carry_read_by(index)

    def carry_from_tapes(
        self, index: int, taped: list[Tensor | None], final: list[Tensor | None]
    ) -> list[Tensor | None]:
        """The carried value layer `index` read in the forward sweep, from what the tapes keep
        (`carry_taped_by`): its own tape's `taped`, or for block_states the first K slots of the final
        input's `final` [B, S, K_final, D] per batch, K the block-boundary layers below layer `index`."""
        if self.carried != BLOCK_STATES:
            return taped
        slots = self._blocks_below(index)
        return [blocks[..., :slots, :] for blocks in final]

    def moe_view(self, index: int) -> MoELayerView | None:
        layer = self.view.layer(index)
        return layer if isinstance(layer, MoELayerView) else None

    def close(self) -> None:
        self._ckpt.close()

    def __enter__(self) -> LayerwiseModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _swap_moe_block(self, index: int, module: nn.Module, run_moe: RunMoE | None, cast_experts: bool):
        """Put a moelab MoELayer (from the view) in place of layer `index`'s MoE block, its
        routed experts in `dtype` or (not cast_experts) as stored; returns `install_moe`'s (name of
        the moelab layer, function putting transformers' modules back), or None for a dense layer."""
        view = self.moe_view(index)
        if view is None:
            return None
        found = find_moe_modules(module, index, view.router.num_choices, view.router.weight.shape[1], self.family.moe_block)
        if view.shared is not None and not found.shared_in_block:
            view = dataclasses.replace(view, shared=None)  # the decoder layer adds its shared experts itself
        moe = moe_layer_from_view(view).eval()
        del view  # the layer holds the tensors now: converting it frees each stored tensor in turn
        if bad := non_finite_names(moe.named_parameters()):
            raise CheckpointError(
                f"{self.path}: NaN or Inf in layer {index}'s MoE block ({', '.join(bad)}): the weights are corrupt"
            )
        # without cast_experts the experts stay as stored, cast one expert at a time as they compute; the
        # router computes in float32 anyway: its weight and biases keep what the file stores, never a
        # bf16 rounding of it (DeepSeek-V3's are float32 in a bf16 checkpoint, kept so by transformers)
        for part in (moe.shared, moe.latent, moe.experts if cast_experts else None):
            if part is not None:
                part.to(self.dtype)
        if moe.output_bias is not None:  # computed with the block's output, in its dtype
            moe.output_bias = nn.Parameter(moe.output_bias.detach().to(self.dtype), moe.output_bias.requires_grad)
        moe.router.float()
        return install_moe(module, index, found, moe, run_moe, self.family)

    def _load(self, module: nn.Module, prefix: str, skip: str | None) -> None:
        """Read `module`'s parameters and persistent buffers from disk (those under `skip`, the
        swapped-in MoE layer, already hold the view's tensors)."""
        skipped = () if skip is None else (skip,)
        load_tensors(
            module, self._ckpt, self.dtype, prefix=prefix, skip=skipped, renames=self.family.stored_renames,
            splits=self.family.stored_splits, shards=self.family.stored_shards, keep_float32=self._float32,
        )  # fmt: skip

    @contextlib.contextmanager
    def _outside_layers(self, *, head: bool = False):
        """The tensors outside the decoder layers (embedding, final norm, ...) while `embed` runs;
        the output head stays on meta unless `head` (`embed` never reaches it)."""
        module = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        module = module if module is not None else getattr(self.model, "lm_head", None)
        head_name = (
            None if head else next((name for name, m in self.model.named_modules() if m is module), None)
        )
        loaded, tensors = [], {}
        skipped = tuple(f"{name}." for name in (self._layers_name, head_name, *beside_language_model(self.model)) if name)
        for name, p in self.model.named_parameters():  # a tied head's weight is listed under the embedding
            if name.startswith(skipped):  # the vision tower of a vision-language skeleton: text never reaches it
                continue
            key = stored_key(self._ckpt, self._stored_as.get(name, name), self.family.stored_renames)
            if key not in tensors:
                kept = self._float32 is not None and self._float32.search(name)
                renames = self.family.stored_renames
                cast = torch.float32 if kept else self.dtype
                if key in self._ckpt:
                    tensors[key] = _cast(self._ckpt, key, self._ckpt.get(key), p, cast, weight=True)
                else:
                    tensors[key] = _merged(self._ckpt, key, self.model, p.shape, renames).to(cast)
            set_tensor(self.model, name, tensors[key])  # tied names get the same tensor again
            loaded.append(name)
        try:
            yield
        finally:
            for name in loaded:
                set_tensor(
                    self.model, name, torch.empty(self.model.get_parameter(name).shape, device="meta")
                )

    @contextlib.contextmanager
    def _stand_ins(self, recorded: list, feed: list[Tensor] | None = None):
        """Replace every decoder layer's forward by one that records its inputs and passes the
        hidden states through; the last one stops the forward pass. With `feed`, layer 0 passes
        on feed[0] instead of its input and the last one lets the pass go on to the output head
        (the head sees feed[0] as the last layer's output); every pass records its layers' inputs."""
        calls: list[tuple[tuple, dict]] = []
        first: list[Tensor] = []
        returns_tuple = self.family.layer_returns_tuple

        def stand_in(index: int):
            # the layer's inputs after (self, hidden_states), in order
            positional = _parameters(self._layers[index])[2:]

            def forward(hidden_states, *args, **kwargs):
                if self.carried is not None:  # by name: the run hands the carried value itself (`_kwargs`)
                    args, kwargs = (), {**dict(zip(positional, args)), **kwargs}
                # the carried value is not recorded: the model loop builds Inkling 2's block_states from the
                # pass-through states (wrong), one tensor a block (0 + 1 + ... + K copies of the states);
                # nor are Inkling 2 Loop's messages, made from them too (the run computes its own: `_enter_loop`)
                recorded_kwargs = {n: v for n, v in kwargs.items() if n not in (self.carried, LOOP_MESSAGES)}
                if len(calls) == len(self.schedule):  # the forward pass before is done
                    calls.clear()
                if not calls:
                    first[:] = [hidden_states]
                    hidden_states = hidden_states if feed is None else feed[0]
                if index != self.schedule[len(calls)]:
                    raise CheckpointError(
                        f"{self.path}: the model's forward pass runs layer {index} at step {len(calls)}, where moelab "
                        f"runs layer {self.schedule[len(calls)]}; moelab cannot run it layer by layer"
                    )
                calls.append((args, recorded_kwargs))
                if len(calls) == len(self.schedule):
                    recorded.append((first[0], list(calls)))
                    if feed is None:
                        raise _Stop
                if self.carried in HANDED_ON:
                    return hidden_states, kwargs.get(self.carried)
                return (hidden_states, None, None) if returns_tuple else hidden_states

            return forward

        for i, layer in enumerate(self._layers):
            layer.forward = stand_in(i)
        try:
            yield
        finally:
            for layer in self._layers:
                del layer.forward


def install_moe(
    layer: nn.Module, index: int, found: MoEModules, moe: MoELayer, run_moe: RunMoE | None, family
) -> tuple[str, Callable[[], None]]:
    """Put moelab's `moe` into decoder layer `index` (`layer`, whose MoE modules are `found`) in place
    of the family's MoE block (`MoEBlock`), or, where the layer holds its router and experts itself
    (`Family.inline_routed_norm`, Gemma 4), of its router, its experts and the norm of their sum
    (`InlineMoE`). Returns (the name of `moe` inside `layer`, a function that puts the family's
    modules back)."""
    names = replaced_modules(index, found, family)
    if found.block:
        stand_ins = [MoEBlock.replacing(layer.get_submodule(found.block), moe, run_moe, family)]
    else:
        stand_ins = list(InlineMoE.parts(moe, run_moe))
    if family.vision_block is not None:
        stand_ins.append(_TextOnly(family.vision_block))
    originals = {name: layer.get_submodule(name) for name in names}
    for name, stand_in in zip(names, stand_ins, strict=True):
        layer.set_submodule(name, stand_in)
    moe_name = f"{found.block or found.experts}.moe"

    def restore() -> None:
        for name, original in originals.items():
            layer.set_submodule(name, original)

    return moe_name, restore


def replaced_modules(index: int, found: MoEModules, family) -> list[str]:
    """The modules of decoder layer `index` that `install_moe` replaces: its MoE block, or a layer's
    router, experts and routed norm where it holds them itself (`Family.inline_routed_norm`); then the
    family's vision block (`Family.vision_block`), if it has one."""
    vision = [] if family.vision_block is None else [family.vision_block]
    if found.block:
        return [found.block, *vision]
    if family.inline_routed_norm is None:
        raise CheckpointError(
            f"layer {index}: the router {found.router} and experts {found.experts} share no MoE block module; "
            f"moelab cannot run {family.name}'s decoder layers with its own MoE layer"
        )
    return [found.router, found.experts, family.inline_routed_norm, *vision]


class _TextOnly(nn.Module):
    """Stands in for a decoder layer's vision block (`Family.vision_block`) in a run on text, which
    leaves its tensors unread: refuses to run."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise CheckpointError(
            f"moelab runs this model on text alone: its {self.name} (image and video tokens) is not loaded; "
            "run image or video inputs with transformers"
        )


class InlineMoE(nn.Module):
    """Stands in for the experts of a decoder layer that holds its router and experts itself (Gemma 4,
    whose layer calls `router(x)`, then `experts(norm(x), indices, weights)`, then its norm of their
    sum): computes moelab's MoELayer (or `run_moe`) on the x the router's stand-in (`parts`) kept,
    which norms the experts' input and their sum itself, and returns its output."""

    def __init__(self, moe: MoELayer, run_moe: RunMoE | None, pending: list[Tensor]):
        super().__init__()
        self.moe, self.run_moe, self._pending = moe, run_moe, pending

    @classmethod
    def parts(cls, moe: MoELayer, run_moe: RunMoE | None) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(the router's stand-in, the experts', the routed norm's: an identity)."""
        pending: list[Tensor] = []
        return _KeepInput(pending), cls(moe, run_moe, pending), nn.Identity()

    def forward(self, hidden: Tensor, *args, **kwargs) -> Tensor:
        if not self._pending:
            raise RuntimeError("the decoder layer called its experts before its router; moelab cannot run it")
        x = self._pending.pop()
        return self.moe(x)[0] if self.run_moe is None else self.run_moe(self.moe, x)


class _KeepInput(nn.Module):
    """Stands in for an inline router (`InlineMoE`): keeps its input for the experts' stand-in and
    returns (None, None, None) in place of transformers' (probabilities, weights, indices)."""

    def __init__(self, pending: list[Tensor]):
        super().__init__()
        self._pending = pending

    def forward(self, x: Tensor) -> tuple[None, None, None]:
        self._pending[:] = [x]
        return None, None, None


class MoEBlock(nn.Module):
    """Stands in for a family's MoE block: computes it with moelab's MoELayer (or `run_moe`), then
    the family's output norm (`Family.block_output_norm`: transformers' module, held under its
    name in the block, so that its tensors load as the block's), and returns what the family's
    block returns."""

    def __init__(
        self, moe: MoELayer, run_moe: RunMoE | None, returns: str, output_norm: tuple[str, nn.Module] | None = None
    ):
        super().__init__()
        self.moe = moe
        self.run_moe = run_moe
        self.returns = returns
        self.output_norm = None if output_norm is None else output_norm[0]
        if output_norm is not None:
            self.add_module(*output_norm)

    @classmethod
    def replacing(cls, block: nn.Module, moe: MoELayer, run_moe: RunMoE | None, family) -> MoEBlock:
        """The stand-in for transformers' MoE block `block` of `family`."""
        norm = family.block_output_norm
        return cls(moe, run_moe, family.block_returns, None if norm is None else (norm, getattr(block, norm)))

    def forward(self, hidden: Tensor, *args, **kwargs):
        if self.returns == "flat":  # ERNIE-4.5-VL's text tokens may come gathered into one flat tensor
            hidden = hidden.reshape(-1, self.moe.router.dim)
        if self.returns == "router_states":  # ZAYA's block(x, prev_router_hidden_states) -> (y, its own)
            context = {ROUTER_STATES_INPUT: args[0] if args else kwargs.get(ROUTER_STATES)}
        else:
            context = token_context(self.moe, kwargs)
        y = self.moe(hidden, context=context)[0] if self.run_moe is None else self.run_moe(self.moe, hidden, context=context)
        if self.output_norm is not None:
            y = getattr(self, self.output_norm)(y)
        if self.returns == "router_states":
            return y, self.next_router_states(hidden, context[ROUTER_STATES_INPUT])
        if self.returns == "tuple":
            return y, None
        if self.returns == "moelab":
            return y, MoEResult()
        if self.returns == "flat":  # router logits are not computed: NaN, so that any use of them shows
            return y.flatten(), y.new_full((y.numel() // y.shape[-1] * self.moe.router.num_experts,), float("nan"))
        return y

    def next_router_states(self, hidden: Tensor, states: Tensor | None) -> Tensor:
        """hidden [B, S, D], the router states handed in [B, S, R] | None -> the states the block hands
        the next layer [B, S, R] in hidden's dtype (`MLPRouter.next_state`)."""
        flat = router_inputs(self.moe.router, hidden, {ROUTER_STATES_INPUT: states})
        states = self.moe.router.next_state(hidden.reshape(-1, hidden.shape[-1]), *flat)
        return states.view(*hidden.shape[:-1], -1).to(hidden.dtype)


def _parameters(layer: nn.Module) -> list[str]:
    """The names of a decoder layer's forward inputs, (self, hidden_states, ...) in order."""
    return list(inspect.signature(type(layer).forward).parameters)


def _loss_gradients(
    batches: Sequence[Tensor],
    inputs: Sequence[tuple[Tensor, ...]],
    logits: Callable[..., Tensor],
    scale: float,
    shift: int,
) -> list[tuple[Tensor, ...]]:
    """Per batch of ids [B, S] and of inputs (states [B, L, D], block_states [B, L, K, D], ...), the
    gradients with respect to each input of `scale` x the summed cross-entropy of logits(ids [1, S],
    *the inputs' rows [1, ...] requiring grad) -> [S - shift, V] against ids[shift:], one sequence
    at a time."""
    grads = []
    for ids, tensors in zip(batches, inputs):
        grad = tuple(torch.empty_like(t) for t in tensors)
        for row in range(ids.shape[0]):
            with torch.enable_grad():
                rows = [t[row : row + 1].detach().requires_grad_(True) for t in tensors]
                predicted = logits(ids[row : row + 1], *rows)
                predicted = predicted.float() if predicted.element_size() < 4 else predicted  # bf16: in fp32
                loss = torch.nn.functional.cross_entropy(predicted, ids[row, shift:], reduction="sum") * scale
                for g, got in zip(grad, torch.autograd.grad(loss, rows, allow_unused=True, materialize_grads=True)):
                    g[row : row + 1] = got
        grads.append(grad)
    return grads


def _normed(norm: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The norm module `norm` (the family's RMSNorm) applied to x with `weight` as its weight."""
    return torch.func.functional_call(norm, {"weight": weight}, (x,))


def skeleton(path: Path, config: dict, family, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of the checkpoint at `path` (config.json `config`, adapter `family`) with its
    parameters on the meta device: moelab's own class for a moelab checkpoint (its rotary tables in
    `dtype`), else transformers'."""
    if family is NATIVE:
        return native_skeleton(config, dtype)
    from transformers import AutoConfig

    from moelab.hf.loading import check_transformers_knows

    check_transformers_knows(path)
    return transformers_skeleton(AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False))


def transformers_skeleton(config) -> nn.Module:
    """The transformers language model of `config` (`language_model_class`) with its parameters on
    the meta device; the buffers it computes itself (rotary tables) are made as `from_pretrained`
    makes them."""
    cls, config = language_model_class(config)
    with contextlib.ExitStack() as stack:
        for context in cls.get_init_context(torch.float32, False, False, None):
            stack.enter_context(context)
        model = cls(config)
    # transformers' own steps after loading weights: non-persistent buffers off meta, then initialised
    model._move_missing_keys_from_meta_to_device(set(), None, None, None)
    model._initialize_missing_keys(False)
    return model.eval()


def language_model_class(config) -> tuple[type, Any]:
    """(the transformers class, its config) that runs `config`'s language model on token ids: its
    causal LM; for a multimodal config, the causal LM transformers maps it to (Qwen3.5) or the one
    of its text config (Kimi-K2.5's DeepSeek-V3), else the vision-language model itself, which runs
    text alone (Qwen3-VL-MoE, GLM-4.5V), or the sub-model that holds it, with its own config
    (Qwen3-Omni-MoE's thinker: `moelab.hf.multimodal.SUBMODELS`); a CheckpointError where
    transformers has none."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    text = config.get_text_config()
    sub = submodel_config(config)
    for cls, settings in (
        (MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None), config),
        (MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text), None), text),
        (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING.get(type(config), None), config),
        (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING.get(type(sub), None), sub),
    ):
        if cls is not None:
            return cls, settings if isinstance(settings, cls.config_class) else text
    raise CheckpointError(f"transformers has no causal LM for model_type {config.model_type!r}")


def submodel_config(config) -> Any:
    """The config of the sub-model that holds a release's language model (`moelab.hf.multimodal.SUBMODELS`:
    Qwen3-Omni-MoE's thinker_config), None for others."""
    from moelab.hf.multimodal import SUBMODELS

    key, _ = SUBMODELS.get(getattr(config, "model_type", None), (None, None))
    return getattr(config, key, None) if key else None


def native_skeleton(config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A moelab model of `config` on the meta device but for its rotary tables (no checkpoint holds
    them), made in `dtype` as `model.to(dtype)` leaves them (bf16 attention reads bf16 tables)."""
    from moelab.models.config import ModelConfig
    from moelab.models.transformer import MoETransformer, rope_tables

    cfg = ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(dtype), sin.to(dtype)
    return model.eval()


def load_tensors(
    module: nn.Module,
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    *,
    prefix: str = "",
    skip: Sequence[str] = (),
    stored_as: dict[str, str] | None = None,
    renames: tuple[tuple[str, str], ...] = (),
    splits: tuple[tuple[tuple[str, ...], str], ...] = (),
    shards: tuple[tuple[str, str | tuple[str, ...]], ...] = (),
    keep_float32: re.Pattern | None = None,
) -> None:
    """Give `module`'s parameters and persistent buffers the checkpoint's tensors `prefix + name`,
    cast to `dtype` (to float32 where `keep_float32` matches prefix + name: `float32_names`); names
    under a module in `skip` are left alone; stored_as: {name: the name its tensor is stored under}
    for tied parameters (`tied_names`), read once and shared; renames: (in memory, on disk) parts of
    names the family stores otherwise (`Family.stored_renames`); splits: tensors it stores fused
    (`Family.stored_splits`), each part read as its rows of the fused one; shards: tensors it stores
    as shards (`Family.stored_shards`), read whole (`read_shards`). A tensor missing from the
    checkpoint or shaped otherwise than `module` (built from config.json) expects is a
    CheckpointError."""
    persistent = {
        f"{name}.{b}" if name else b
        for name, m in module.named_modules()
        for b in m._buffers
        if b not in m._non_persistent_buffers_set
    }
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    params = set(names)
    names += [n for n, _ in module.named_buffers() if n in persistent]
    tensors: dict[tuple[str, range | None], Tensor] = {}
    for name in names:
        if any(name.startswith(s + ".") for s in skip):
            continue
        key, rows = stored_key(checkpoint, prefix + (stored_as or {}).get(name, name), renames), None
        if key not in checkpoint:
            key, rows = _fused_rows(module, name, checkpoint, prefix, splits, renames) or (key, None)
        parts = [key] if key in checkpoint else shard_keys(checkpoint, prefix + name, shards, renames)
        current = module.get_parameter(name) if name in params else module.get_buffer(name)
        wanted = tuple(current.shape)
        kept = keep_float32 is not None and keep_float32.search(prefix + name)
        # as transformers casts on loading: to the run's dtype where the module's tensor is floating,
        # else to its own (integer and bool buffers: Qwen4-Exp's n-gram vocabulary sizes and offsets)
        cast = (torch.float32 if kept else dtype) if current.is_floating_point() else current.dtype
        if not parts:  # stored as several tensors transformers merges on loading, or not at all
            set_tensor(module, name, _merged(checkpoint, key, module, current.shape, renames).to(cast))
            continue
        key = parts[0] if len(parts) == 1 else f"{parts[0]}..{parts[-1]}"
        stored = _stacked_shape(checkpoint, parts)
        if (stored if rows is None else (len(rows), *stored[1:])) != wanted:
            raise CheckpointError(
                f"{checkpoint.directory}: {key} is {list(stored)} but config.json makes it "
                f"{list(wanted) if rows is None else f'{list(wanted)} in rows {rows.start}..{rows.stop}'}; "
                "config.json does not describe these weights"
            )
        if (key, rows) not in tensors:
            tensor = checkpoint.get(key, rows) if len(parts) == 1 else read_shards(checkpoint, parts)
            tensors[key, rows] = _cast(checkpoint, key, tensor, current, cast, weight=name in params)
        set_tensor(module, name, tensors[key, rows])


def _cast(checkpoint: Checkpoint, key: str, tensor: Tensor, like: Tensor, dtype: torch.dtype, *, weight: bool) -> Tensor:
    """Checkpoint tensor `key`, read as `like`'s value (a parameter, `weight`, or buffer of the model built
    from config.json), cast to `dtype`: refused where its shape differs (more rows aside: a vocabulary
    padded past the one the skeleton is built for, as Inkling 2's unembedding is), where it is an integer
    one for a floating-point parameter (the cast would give other weights; a float buffer stored as
    integers is cast, as transformers does) or where it holds NaN or Inf once cast."""
    more_rows = tensor.dim() == like.dim() > 0 and tensor.shape[1:] == like.shape[1:] and tensor.shape[0] > like.shape[0]
    if tensor.shape != like.shape and not more_rows:
        raise CheckpointError(
            f"{checkpoint.directory}: {key} is {list(tensor.shape)} but config.json makes it {list(like.shape)}; "
            "config.json does not describe these weights"
        )
    if weight and like.is_floating_point() and not tensor.is_floating_point():
        raise CheckpointError(
            f"{checkpoint.directory}: {key} has dtype {tensor.dtype} where the model has floating-point weights; "
            "the checkpoint is corrupt (or quantized without a quantization_config): re-download it"
        )
    tensor = tensor.to(dtype)
    if non_finite_names([(key, tensor)]):
        raise CheckpointError(f"{checkpoint.directory}: NaN or Inf in {key}: the weights are corrupt")
    return tensor


def _merged(
    checkpoint: Checkpoint, key: str, module: nn.Module, shape: torch.Size, renames: tuple[tuple[str, str], ...]
) -> Tensor:
    """Tensor `key` of `module` (a transformers model), absent from the checkpoint under that name: built
    from the several tensors transformers merges it from on loading (`read_merged`: Inkling 2 Loop's
    message queries as released; each stored under the family's `renames`), checked against the `shape`
    config.json makes it; a CheckpointError where it is not stored either way."""
    config = getattr(module, "config", None)
    model_types = () if config is None else {config.model_type, config.get_text_config().model_type}
    try:
        merged = read_merged(checkpoint, key, model_types, lambda name: stored_key(checkpoint, name, renames))
    except RuntimeError as error:  # transformers' operation on parts that do not fit together
        raise CheckpointError(f"{checkpoint.directory}: {key} cannot be merged from the tensors it is stored as: {error}")
    if merged is None:
        raise CheckpointError(f"{checkpoint.directory}: {key} is not in the checkpoint; the model cannot be run")
    finite = not non_finite_names([(key, merged)])
    if merged.shape != shape or not finite:
        raise CheckpointError(
            f"{checkpoint.directory}: {key}, merged from the tensors it is stored as, is {list(merged.shape)} "
            f"(finite: {finite}) but config.json makes it a finite {list(shape)}"
        )
    return merged


def _fused_rows(
    module: nn.Module,
    name: str,
    checkpoint: Checkpoint,
    prefix: str,
    splits: tuple[tuple[tuple[str, ...], str], ...],
    renames: tuple[tuple[str, str], ...],
) -> tuple[str, range] | None:
    """(the stored key, the rows) of the fused tensor that holds parameter `name` (`Family.stored_splits`:
    the parts lie one after the other, each as many rows as `module`'s parameter has), None if none does."""
    for parts, fused in splits:
        part = next((p for p in parts if p in name), None)
        if part is None:
            continue
        sizes = [module.get_parameter(name.replace(part, p)).shape[0] for p in parts]
        key = stored_key(checkpoint, prefix + name.replace(part, fused), renames)
        if key in checkpoint and checkpoint.shape(key)[0] != sum(sizes):
            raise CheckpointError(
                f"{checkpoint.directory}: {key} has {checkpoint.shape(key)[0]} rows but config.json makes its parts "
                f"{', '.join(parts)} {sum(sizes)}; config.json does not describe these weights"
            )
        start = sum(sizes[: parts.index(part)])
        return key, range(start, start + sizes[parts.index(part)])
    return None


def shard_keys(
    checkpoint: Checkpoint,
    key: str,
    shards: tuple[tuple[str, str | tuple[str, ...]], ...],
    renames: tuple[tuple[str, str], ...],
) -> list[str]:
    """The stored keys of the shards tensor `key` (its name in memory) is stored as (`Family.stored_shards`):
    numbered shards 0, 1, ... while the checkpoint holds them, or named parts where it holds them all;
    [] if it holds none."""
    for memory, disk in shards:
        if memory in key:
            if isinstance(disk, tuple):
                stored = [stored_key(checkpoint, key.replace(memory, part), renames) for part in disk]
                return stored if all(name in checkpoint for name in stored) else []
            names = (key.replace(memory, disk.replace("*", str(i))) for i in itertools.count())
            stored = (stored_key(checkpoint, name, renames) for name in names)
            return list(itertools.takewhile(checkpoint.__contains__, stored))
    return []


def _stacked_shape(checkpoint: Checkpoint, keys: list[str]) -> tuple[int, ...]:
    """The shape of `keys`' tensors concatenated along their first dim: [sum of rows, *the rest they share]."""
    shapes = [tuple(checkpoint.shape(key)) for key in keys]
    if len({shape[1:] for shape in shapes}) > 1:
        raise CheckpointError(
            f"{checkpoint.directory}: the shards {keys[0]}..{keys[-1]} differ past their first dim "
            f"({sorted({s[1:] for s in shapes})}); they do not make one tensor"
        )
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def read_shards(checkpoint: Checkpoint, keys: list[str]) -> Tensor:
    """The tensors `keys` [R_i, ...] concatenated along their first dim [sum R_i, ...], as transformers'
    Concatenate(dim=0) makes them on loading: each shard read and copied into its rows in turn, so at
    most one shard is held besides the whole.

    Memory: Qwen4-Exp's n-gram table lives in its PLE decoder layers (model.layers.{i}.ple.ple_embedding,
    not among `_outside_layers`' tensors), so the layer-by-layer run holds a PLE layer's whole table in
    host memory while that layer runs over every batch, freed with the layer (the released table is
    ~95 GiB in bf16; twice that for a moment where the run's dtype differs from the stored one, which
    `load_tensors` casts), and offloaded decoding holds every PLE layer's table with the dense weights.
    Reading only the rows a batch uses would take the batch's n-gram ids first (transformers computes
    them in Qwen4ExpTextNGramEmbedding.forward from the token history: hashed n-grams modulo each
    head's prime, plus its offset; at most tokens x ngram heads distinct rows), then those rows of the
    shards (`Checkpoint.get(key, rows)` per run of rows), and an embedding module that looks the ids up
    in them; none is built."""
    whole, start = None, 0
    for key in keys:
        shard = checkpoint.get(key)
        if whole is None:
            whole = torch.empty(_stacked_shape(checkpoint, keys), dtype=shard.dtype, device=shard.device)
        whole[start : start + shard.shape[0]] = shard
        start += shard.shape[0]
    return whole


def float32_names(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """The names of the tensors transformers keeps in float32 when it loads `model` in `dtype`
    (its class's `_keep_in_fp32_modules_strict` in bf16 and fp16, `_keep_in_fp32_modules` in fp16:
    DeepSeek-V3's router weights and correction biases, AFMoE's norms ...), matched as transformers
    matches them (each entry a pattern searched in the name, "*" any run); None where none are."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    patterns = [name.replace("*", ".*") for name, kept in plan.items() if kept == torch.float32]
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def stored_key(checkpoint: Checkpoint, key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """The name tensor `key` (its name in memory) is stored under: itself, else the first of its
    renamed forms (`Family.stored_renames`) the checkpoint holds, else the form every rename gives
    in turn where the checkpoint holds that (Mistral Large 4's original names: its root and its
    modules renamed), else itself (missing)."""
    if key in checkpoint:
        return key
    renamed = next((k for memory, disk in renames if memory in key and (k := key.replace(memory, disk)) in checkpoint), None)
    if renamed is not None:
        return renamed
    chained = functools.reduce(lambda name, rename: name.replace(*rename), renames, key)
    return chained if chained in checkpoint else key


def _as_stored(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """`name` with the first of the renames that applies to it."""
    return next((name.replace(memory, disk) for memory, disk in renames if memory in name), name)


def set_tensor(module: nn.Module, name: str, tensor: Tensor) -> None:
    """Make `module`'s parameter or buffer `name` ("a.b.weight") this tensor."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def _to_meta(module: nn.Module) -> None:
    """Free a layer's parameters and persistent buffers (computed buffers stay)."""
    for name, m in module.named_modules():
        for attr, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[attr] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False
                )
        for attr, b in list(m._buffers.items()):
            if b is not None and attr not in m._non_persistent_buffers_set and not b.is_meta:
                m._buffers[attr] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def tied_names(model: nn.Module, checkpoint, renames: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """{parameter name: the name its tensor is stored under} for parameters tied to another (an
    output head sharing the embedding's weight: tied in the skeleton, or by the config's
    tie_word_embeddings) where only some of them are stored. Where every name of a tie is stored,
    each is read as stored: transformers' `from_pretrained` keeps a stored head that differs from
    the embedding despite the config (and ties equal ones, which reads the same). Ties are read
    once, from the fresh skeleton: loading tensors one name at a time later unties them in memory.
    renames: `Family.stored_renames`, under which a name may be stored (ERNIE-4.5-VL's embedding)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):  # a transformers skeleton on meta is not tied yet
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and embedding is not None and head.weight is not embedding.weight:
            groups[id(embedding.weight)] = [names[id(embedding.weight)], names[id(head.weight)]]
            groups.pop(id(head.weight), None)
    stored = {}
    for names in groups.values():
        present = [n for n in names if stored_key(checkpoint, n, renames) in checkpoint]
        if 0 < len(present) < len(names):
            stored |= {n: present[0] for n in names}
    return stored
