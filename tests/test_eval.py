"""moelab eval: the report's numbers on worked examples and on a model against itself."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from moelab import cli
from moelab.eval.evaluate import EvalOptions, evaluate, is_degenerate, parameter_counts, wilson_interval
from moelab.models import ModelConfig, MoETransformer, load_pretrained, save_pretrained
from moelab.nn import MoEConfig

# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, dim=32, n_layers=2, n_heads=4, max_seq_len=64,
                      moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2))  # fmt: skip
    return save_pretrained(MoETransformer(cfg), tmp_path_factory.mktemp("m") / "m")


SMALL = EvalOptions(
    domains=["code", "german"], eval_tokens=256, seq_len=32, prompts=1, prompt_tokens=8, gen_tokens=8
)


def test_loops_are_repeated_ngrams():
    assert is_degenerate([1, 2, 3, 4] * 3)
    assert not is_degenerate([1, 2, 3, 4, 1, 2, 3, 4, 9, 1, 2, 3])  # the 4-gram 1 2 3 4 twice only
    assert is_degenerate([7] * 6) and not is_degenerate([7] * 5)  # 7 7 7 7 three times needs 6 tokens
    assert not is_degenerate(list(range(50)))


def test_wilson_interval_matches_the_formula():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_model_against_itself_agrees_perfectly(model_dir):
    report = evaluate(model_dir, base=model_dir, options=SMALL, quiet=True)
    for name in ("code", "german", "all"):
        assert report["agreement"][name]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert report["agreement"][name]["top1_agreement"] == 1.0
        assert report["domains"][name]["perplexity"] == report["base_domains"][name]["perplexity"]
    all_ = report["domains"]["all"]
    assert (
        all_["tokens"]
        == report["domains"]["code"]["tokens"] + report["domains"]["german"]["tokens"]
        == 2 * 256
    )
    assert math.isclose(all_["perplexity"], math.exp(all_["loss"]))
    assert (
        report["generation"]["prompts"] == 2 and report["generation"]["model"] == report["generation"]["base"]
    )


def test_parameter_counts(model_dir):
    counts = parameter_counts(model_dir)
    routed = 2 * 4 * 3 * 32 * 32  # layers x experts x (gate, up, down) x D x I
    assert counts["routed_experts"] == routed
    assert counts["active"] == counts["total"] - routed + routed // 2  # top-2 of 4
    assert counts["total"] == sum(p.numel() for p in MoETransformer(
        ModelConfig(vocab_size=8192, dim=32, n_layers=2, n_heads=4, max_seq_len=64,
                    moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2))).state_dict().values())  # fmt: skip


def test_parameter_counts_leave_out_a_hash_routers_token_table(tmp_path):
    """A hash layer's table of token ids is no weight: the counts are the model's parameters (what
    `moelab info` counts), its 2 x [V, top_k] integers apart."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, dim=32, n_layers=2, n_heads=4, max_seq_len=64,
                      moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2, router="hash"))  # fmt: skip
    model = MoETransformer(cfg)
    counts = parameter_counts(save_pretrained(model, tmp_path / "m"))
    routed = 2 * 4 * 3 * 32 * 32
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["routed_experts"] == routed and counts["active"] == counts["total"] - routed // 2


def test_parameter_counts_take_jetmoe_s_attention_experts_as_routed(tmp_path):
    """JetMoE's attention is a mixture of experts too (self_attention.experts, top_k of
    num_local_experts per token): a token runs 2 of its 4 attention experts as it runs 2 of its 4
    MoE experts, so half of both are inactive (the attention's were all counted active)."""
    from hf_tiny import build

    model = build("jetmoe")
    model.save_pretrained(tmp_path / "m")
    counts = parameter_counts(tmp_path / "m")
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n and "_linear" in n)
    attention = sum(p.numel() for n, p in model.named_parameters() if "self_attention.experts." in n and "_linear" in n)
    assert mlp and attention
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["routed_experts"] == mlp
    assert counts["active"] == counts["total"] - mlp // 2 - attention // 2


def test_the_cli_writes_a_table_and_json(model_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "eval.json"
    args = ["moelab", "eval", str(model_dir), "--base", str(model_dir), "--domain", "code", "--eval-tokens", "64",
            "--seq-len", "32", "--prompts", "0", "--json", str(path), "--quiet"]  # fmt: skip
    monkeypatch.setattr("sys.argv", args)
    cli.main()
    out = capsys.readouterr().out
    assert "KL(base||model) (nats/token)" in out and json.loads(path.read_text())["format"] == "moelab-eval/1"
    monkeypatch.setattr("sys.argv", args)
    with pytest.raises(SystemExit):
        cli.main()  # the JSON exists: --overwrite is needed
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_a_loop_check_that_checked_nothing_says_so(model_dir, tmp_path, capfd):
    """Texts shorter than a prompt leave no continuation to check: the report says it was skipped
    (it used to show "0/0 ... loop (0%)" and a rate of 0.0), and scoring shows a bar unless quiet."""
    from dataclasses import replace

    from moelab.eval.evaluate import render_report

    data = tmp_path / "short.jsonl"
    data.write_text('{"text": "def f(x): return x"}\n')
    report = evaluate(model_dir, options=replace(SMALL, data=str(data), domains=None, prompt_tokens=32), quiet=False)
    assert "score" in capfd.readouterr().err
    assert report["generation"] == {"prompts": 0, "skipped": "no domain has the 32 tokens a prompt takes"}
    assert "rate" not in json.dumps(report["generation"])
    table = render_report(report)
    assert "not checked: no domain has the 32 tokens" in table.caption


def test_the_table_is_as_wide_as_its_title_and_caption():
    """Without a base the table has two narrow columns, and rich broke the model's path in its title
    mid-name ("/tmp/ha/src/moelab/asse" / "ts/models/ref-8e-top2") and the size line in two."""
    import io

    from rich.console import Console

    from moelab.eval.evaluate import render_report

    model = "/some/long/path/to/a/compressed/checkpoint/reap-6e"
    report = {"model": model, "base": None, "options": {}, "domains": {"code": {"perplexity": 12.5}},
              "parameters": {"total": 8_597_760, "active": 5_058_816}, "tokens_per_second": 5558.0}  # fmt: skip
    console = Console(file=io.StringIO(), width=160)
    console.print(render_report(report))
    lines = [line.strip() for line in console.file.getvalue().splitlines()]
    assert model in lines
    assert "parameters 8,597,760 (active 5,058,816); 5,558 tokens/s" in lines


def test_the_json_is_never_written_inside_the_model_or_through_a_link(model_dir, tmp_path, monkeypatch, capsys):
    """`--json MODEL/eval.json` used to write into the model directory (the shipped one too), where
    the file then blocked `compress --out MODEL --overwrite`; a link would have become a file."""
    (tmp_path / "results").mkdir()
    (tmp_path / "latest.json").symlink_to(tmp_path / "results" / "eval.json")
    for path, message in [(model_dir / "eval.json", "lies inside the input"), (tmp_path / "latest.json", "is a link")]:
        args = ["moelab", "eval", str(model_dir), "--domain", "code", "--eval-tokens", "64", "--prompts", "0", "--json",
                str(path), "--quiet", "--overwrite"]  # fmt: skip
        monkeypatch.setattr("sys.argv", args)
        with pytest.raises(SystemExit):
            cli.main()
        assert message in capsys.readouterr().err
    assert not (model_dir / "eval.json").exists() and (tmp_path / "latest.json").is_symlink()


def test_dynamic_skipping_runs_fewer_experts(model_dir, tmp_path):
    from dataclasses import replace

    from moelab.compress import CalibrationOptions, calibrate
    from moelab.eval.evaluate import render_report

    stats = calibrate(
        model_dir, tmp_path / "stats", options=CalibrationOptions(tokens=256, seq_len=32), quiet=True
    )
    report = evaluate(
        model_dir,
        base=model_dir,
        options=replace(SMALL, prompts=0, dynamic_skip=str(stats.directory)),
        quiet=True,
    )
    assert report["agreement"]["all"]["kl"] > 0  # the skipped experts change the output
    assert report["agreement"]["all"]["top1_agreement"] > 0.5
    assert report["options"]["dynamic_skip"] == str(stats.directory)  # the report says skipping was on
    assert f"with dynamic skipping (ratios from {stats.directory})" in render_report(report).title
    plain = evaluate(model_dir, options=replace(SMALL, prompts=0), quiet=True)
    assert "skipping" not in render_report(plain).title
    torch.manual_seed(1)  # another model of the same shapes: its ratios are not this one's
    other = save_pretrained(MoETransformer(load_pretrained(model_dir).config), tmp_path / "other")
    with pytest.raises(ValueError, match="their fingerprints differ"):
        evaluate(other, options=replace(SMALL, prompts=0, dynamic_skip=str(stats.directory)), quiet=True)


def test_windows_longer_than_the_context_are_cut_to_it(model_dir, monkeypatch, capsys):
    """max_seq_len is 64: windows of 512 would run positions the model never saw (or fail); they
    are cut to 64, as analyze and calibrate cut them, and the report says what was asked."""
    import dataclasses

    from moelab.eval.evaluate import render_report

    long = evaluate(model_dir, options=dataclasses.replace(SMALL, seq_len=512, prompts=0), quiet=True)
    fits = evaluate(model_dir, options=dataclasses.replace(SMALL, seq_len=64, prompts=0), quiet=True)
    assert long["options"]["seq_len"] == 64 and long["options"]["seq_len_asked"] == 512
    assert "seq_len_asked" not in fits["options"]
    assert "windows of 64 tokens, the context (512 asked)" in render_report(long).caption  # said on the terminal too
    assert "asked" not in render_report(fits).caption
    for name, scored in fits["domains"].items():
        assert (long["domains"][name]["loss_sum"], long["domains"][name]["tokens"]) == (
            scored["loss_sum"], scored["tokens"]
        )
    with pytest.raises(ValueError, match=r"prompt_tokens \+ gen_tokens \(32 \+ 48\) exceed the context of 64.*--new-tokens.*--prompts 0"):
        evaluate(model_dir, options=dataclasses.replace(SMALL, prompt_tokens=32, gen_tokens=48), quiet=True)
    args = ["moelab", "eval", str(model_dir), "--domain", "code", "--eval-tokens", "64", "--seq-len", "32", "--prompts", "1",
            "--prompt-tokens", "8", "--new-tokens", "8", "--quiet"]  # fmt: skip
    monkeypatch.setattr("sys.argv", args)
    cli.main()  # the CLI takes the lengths that fit (it had no such options)
    assert "0/1 greedy" in capsys.readouterr().out


@pytest.fixture(scope="module")
def base_and_model(model_dir, tmp_path_factory):
    """model_dir's model with its output head sharpened (x40: the base) and a blunter, noisier copy
    of it (x10, 10 % noise: the model): the two KL directions differ, top-1 agreement is partial."""
    out = tmp_path_factory.mktemp("pair")
    torch.manual_seed(1)
    net = load_pretrained(model_dir)
    head = net.lm_head.weight.detach().clone()
    noise = 0.1 * head.std() * torch.randn_like(head)
    dirs = []
    for name, weight in (("base", 40 * head), ("model", 10 * (head + noise))):
        with torch.no_grad():
            net.lm_head.weight.copy_(weight)
        dirs.append(save_pretrained(net, out / name))
    return tuple(dirs)


def test_kl_is_base_against_model_and_agreement_is_over_real_tokens(base_and_model):
    """kl = mean over tokens of sum_v p_base (log p_base - log p_model), not the reverse; top-1
    agreement counts only real tokens, also when the last window is mostly padding (40 targets
    in windows of 32)."""
    from dataclasses import replace

    from moelab.trace.data import load_streams
    from moelab.trace.model import checkpoint_encoder

    base_dir, model_dir = base_and_model
    nets = [load_pretrained(path).eval() for path in (base_dir, model_dir)]
    encoder = checkpoint_encoder(base_dir, native=True)
    code = load_streams("corpus", split="test", domains=["code"], encoder=encoder, quiet=True)["code"]
    ids = torch.as_tensor(code[:65].astype("int64"))
    for max_tokens in (64, 40):
        options = replace(SMALL, domains=["code"], eval_tokens=max_tokens, prompts=0)
        report = evaluate(model_dir, base=base_dir, options=options, quiet=True)
        windows = [ids[a : b + 1] for a, b in ((0, 32), (32, max_tokens))]  # each alone, real tokens only
        with torch.no_grad():
            p, q = (
                torch.cat([net(w[None, :-1]).logits[0].float().log_softmax(-1) for w in windows]) for net in nets
            )
        assert len(p) == max_tokens
        kl = float((p.exp() * (p - q)).sum(-1).mean())
        reverse = float((q.exp() * (q - p)).sum(-1).mean())
        agree = float((p.argmax(-1) == q.argmax(-1)).float().mean())
        assert abs(reverse - kl) > 0.2 * kl and 0.3 < agree < 1  # the directions differ; agreement is partial
        for name in ("code", "all"):
            agreement = report["agreement"][name]
            assert agreement["tokens"] == max_tokens
            assert agreement["kl"] == pytest.approx(kl, rel=1e-3)
            assert agreement["top1_agreement"] == pytest.approx(agree)


def test_agreement_with_itself_ignores_a_padded_last_window(model_dir):
    """40 targets in windows of 32: the 24 padded positions of the second window are no tokens,
    so a model against itself agrees on exactly 40 of 40 (not 64 of 40)."""
    from dataclasses import replace

    report = evaluate(model_dir, base=model_dir, options=replace(SMALL, eval_tokens=40, prompts=0), quiet=True)
    for name in ("code", "german", "all"):
        agreement = report["agreement"][name]
        assert agreement["top1_agreement"] == 1.0 and agreement["agree"] == agreement["tokens"]
        assert agreement["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["agreement"]["all"]["tokens"] == report["domains"]["all"]["tokens"] == 2 * 40


def test_prompts_start_at_evenly_spaced_offsets():
    """k of n prompts starts at span * k // n (span: the last possible start), from 0 on; a domain
    shorter than a prompt gives none, one of fewer offsets than prompts each offset once (its one prompt
    was counted twice in the loop rate and its interval)."""
    import numpy as np

    from moelab.eval.evaluate import _prompts

    streams = {"a": np.arange(100), "b": np.arange(1000, 1008), "c": np.arange(5)}
    got = _prompts(streams, EvalOptions(prompts=2, prompt_tokens=8))
    assert [(name, ids.shape, int(ids[0, 0])) for name, ids in got] == [
        ("a", (1, 8), 0), ("a", (1, 8), 46), ("b", (1, 8), 1000)
    ]  # fmt: skip
    assert torch.equal(got[1][1][0], torch.arange(46, 54))
    got = _prompts({"a": np.arange(100)}, EvalOptions(prompts=3, prompt_tokens=10))
    assert [int(ids[0, 0]) for _, ids in got] == [0, 30, 60]  # span 90
    got = _prompts({"a": np.arange(11)}, EvalOptions(prompts=4, prompt_tokens=10))
    assert [int(ids[0, 0]) for _, ids in got] == [0]  # span 1: every k // 4 is 0, one prompt, not four copies


class _Bigram(torch.nn.Module):
    """logits of the next token from the current one alone: each window's loss is known in closed form."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table(ids))


def test_domain_losses_score_max_tokens_real_targets_and_pool_by_tokens(monkeypatch):
    """max_tokens=N scores exactly N targets (the first N + 1 tokens), padding of the last window
    (N = 40 in windows of 16) is neither scored nor counted, and "all" is the token-weighted mean
    of the domains' losses."""
    import numpy as np
    import torch.nn.functional as F

    from moelab.eval import domain_losses

    rng = np.random.default_rng(0)
    streams = {"short": rng.integers(0, 16, 30), "long": rng.integers(0, 16, 500)}
    monkeypatch.setattr(
        "moelab.eval.perplexity.tokenize_split", lambda name, split, quiet=True: streams[name]
    )
    model = _Bigram()
    losses = domain_losses(model, ["short", "long"], seq_len=16, batch_size=2, max_tokens=40)
    expected = {}
    for name, n in (("short", 29), ("long", 40)):
        ids = torch.as_tensor(streams[name][: n + 1])
        with torch.no_grad():
            expected[name] = float(F.cross_entropy(model.table(ids[:-1]), ids[1:]))
        assert losses[name].tokens == n
        assert losses[name].loss == pytest.approx(expected[name], rel=1e-5)
    assert losses["all"].tokens == 69
    pooled = (29 * expected["short"] + 40 * expected["long"]) / 69
    assert losses["all"].loss == pytest.approx(pooled, rel=1e-5)
    assert abs(pooled - (expected["short"] + expected["long"]) / 2) > 1e-3  # not the plain mean
    assert model.training  # restored


@pytest.mark.parametrize("training", [True, False])
def test_domain_losses_run_the_model_in_eval_mode_and_restore_its_mode(monkeypatch, training):
    """Every forward pass sees eval mode (dropout off), the mode the caller set is restored, and
    perplexity is exp(loss)."""
    import numpy as np

    from moelab.eval import domain_losses

    seen = []

    class Recording(_Bigram):
        def forward(self, ids):
            seen.append(self.training)
            return super().forward(ids)

    stream = np.random.default_rng(0).integers(0, 16, 100)
    monkeypatch.setattr("moelab.eval.perplexity.tokenize_split", lambda name, split, quiet=True: stream)
    model = Recording().train(training)
    losses = domain_losses(model, ["a"], seq_len=16, batch_size=2)
    assert seen and not any(seen)
    assert model.training is training
    assert losses["a"].perplexity == pytest.approx(math.exp(losses["a"].loss), rel=1e-12)
    assert losses["a"].loss > 1  # a perplexity well away from 1


def test_rank_rows_split_a_batch_contiguously_and_pad_an_idle_rank_with_an_unscored_row():
    from moelab.data import IGNORE_INDEX
    from moelab.eval.perplexity import _rank_rows

    inputs = torch.arange(5 * 3).view(5, 3)
    targets = inputs + 100
    shares = [_rank_rows(inputs, targets, rank, 3) for rank in range(3)]
    assert [i[:, 0].tolist() for i, _ in shares] == [[0, 3], [6, 9], [12]]
    assert all(torch.equal(t, i + 100) for i, t in shares)
    idle_inputs, idle_targets = _rank_rows(inputs[:2], targets[:2], 3, 4)
    assert torch.equal(idle_inputs, inputs[:1])
    assert (idle_targets == IGNORE_INDEX).all() and idle_targets.shape == (1, 3)


def _window_losses(path, stream, seq_len: int) -> float:
    """The summed next-token loss of `stream` in consecutive windows of `seq_len` targets, one
    window at a time (the naive reference of the evaluation's batches)."""
    import torch.nn.functional as F

    net = load_pretrained(path).eval()
    ids = torch.as_tensor(stream.astype("int64"))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start : start + seq_len + 1]
            total += float(F.cross_entropy(net(window[None, :-1]).logits[0].float(), window[1:], reduction="sum"))
    return total


def test_each_column_is_its_own_models_and_all_pools_by_tokens(model_dir, tmp_path, monkeypatch):
    """Against a base of another size: the model's and the base's perplexities and parameter
    counts each come from their own model; "all" is the token-weighted loss over the domains
    (19 and 70 targets), not the mean of the domains'; a domain of one token (no target) is not
    reported; the table's change is model / base - 1."""
    import io
    import sys
    from dataclasses import replace

    import numpy as np
    from rich.console import Console

    from moelab.eval.evaluate import render_report

    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=8192, dim=32, n_layers=1, n_heads=4, max_seq_len=64,
                      moe=MoEConfig(dim=32, num_experts=2, hidden_dim=16, top_k=1))  # fmt: skip
    small = save_pretrained(MoETransformer(cfg), tmp_path / "small")
    rng = np.random.default_rng(0)
    streams = {"a": rng.integers(0, 8192, 20), "b": rng.integers(0, 8192, 71), "c": np.array([5])}
    monkeypatch.setattr(sys.modules["moelab.eval.evaluate"], "load_streams", lambda *a, **k: streams)
    report = evaluate(small, base=model_dir, options=replace(SMALL, prompts=0), quiet=True)
    assert set(report["domains"]) == set(report["base_domains"]) == {"a", "b", "all"}
    for key, path in (("domains", small), ("base_domains", model_dir)):
        sums = {d: _window_losses(path, streams[d], 32) for d in ("a", "b")}
        for d, n in (("a", 19), ("b", 70)):
            assert report[key][d]["tokens"] == n
            assert report[key][d]["loss"] == pytest.approx(sums[d] / n, rel=1e-4)
        pooled = (sums["a"] + sums["b"]) / 89
        assert report[key]["all"]["loss"] == pytest.approx(pooled, rel=1e-4)
        assert report[key]["all"]["perplexity"] == pytest.approx(math.exp(pooled), rel=1e-4)
        assert abs(pooled - (sums["a"] / 19 + sums["b"] / 70) / 2) > 1e-3  # not the plain mean
    assert report["domains"]["a"]["loss"] != pytest.approx(report["base_domains"]["a"]["loss"], rel=1e-3)
    assert report["parameters"] == parameter_counts(small)
    assert report["base_parameters"] == parameter_counts(model_dir) != report["parameters"]
    console = Console(file=io.StringIO(), width=200)
    console.print(render_report(report))
    change = report["domains"]["a"]["perplexity"] / report["base_domains"]["a"]["perplexity"] - 1
    assert f"{change:+.1%}" in console.file.getvalue()


def test_the_degenerate_rate_counts_looping_continuations_per_domain(monkeypatch):
    """3 of 4 continuations loop (1 of 2 in "a", 2 of 2 in "b"): rate 3/4, its Wilson interval
    and the rate per domain; with batches of 3 prompts, each continuation is its own prompt's
    (the first batch spans both domains: a continuation given to another prompt shows)."""
    from pathlib import Path
    from types import SimpleNamespace

    from moelab.eval.evaluate import _degeneration

    module = sys.modules[_degeneration.__module__]  # the package's `evaluate` is the function
    monkeypatch.setattr(module, "GENERATION_BATCH", 3)
    loop, fresh = [1, 2, 3, 4] * 3, list(range(12))
    continuation = {0: fresh, 1: loop, 2: loop, 3: loop}  # by the prompt's first token
    batches = []
    lm = SimpleNamespace(
        path=Path("m"),
        generate=lambda ids, n: batches.append(len(ids)) or torch.tensor([continuation[int(i)] for i in ids[:, 0]]),
    )
    prompts = [(name, torch.full((1, 4), k)) for k, name in enumerate(("a", "a", "b", "b"))]
    got = _degeneration(lm, prompts, EvalOptions(gen_tokens=12), quiet=True)
    assert got == {"degenerate": 3, "rate": 0.75, "ci95": list(wilson_interval(3, 4)),
                   "by_domain": {"a": 0.5, "b": 1.0}}  # fmt: skip
    assert batches == [3, 1]


@pytest.mark.parametrize("runtime", ["moelab", "transformers"])
def test_prompts_decoded_together_continue_as_each_alone(model_dir, tmp_path, runtime):
    """`LoadedLM.generate` on a batch of prompts gives each prompt's own greedy continuation, in
    moelab's runtime and in transformers' (the model exported)."""
    from moelab.eval.evaluate import LoadedLM
    from moelab.hf.export import export_checkpoint

    path = model_dir if runtime == "moelab" else export_checkpoint(model_dir, tmp_path / "m", "mixtral", quiet=True)
    lm = LoadedLM(path)
    assert lm.native == (runtime == "moelab")
    prompts = torch.randint(0, lm.vocab_size, (4, 6), generator=torch.Generator().manual_seed(0))
    together = lm.generate(prompts, 10)
    assert together.shape == (4, 10)
    assert torch.equal(together, torch.cat([lm.generate(p[None], 10) for p in prompts]))
    assert len({tuple(row) for row in together.tolist()}) > 1  # not one continuation for all


def test_a_prompt_holding_the_pad_token_decodes_whole_in_transformers(model_dir, tmp_path):
    """eval passes transformers' generate pad_token_id=0 and an all-ones attention mask: without
    the mask, generate would infer one from the pad token (eos being another) and mask a prompt's
    token 0 out. The continuations are the greedy ones of the full forward."""
    from moelab.eval.evaluate import LoadedLM
    from moelab.hf.export import export_checkpoint

    lm = LoadedLM(export_checkpoint(model_dir, tmp_path / "m", "mixtral", quiet=True))
    lm.model.generation_config.eos_token_id = 2  # not the pad token, as in most tokenizers
    prompts = torch.randint(1, lm.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    prompts[:, :2] = 0
    ids = prompts
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, lm.logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(lm.generate(prompts, 8), ids[:, 6:])


@pytest.mark.parametrize("moe", [{"router": "expert_choice"}, {"capacity_factor": 0.5}], ids=["expert_choice", "capacity"])
def test_prompts_routed_across_the_batch_decode_together_as_each_alone(tmp_path, monkeypatch, moe):
    """Expert choice and capacity dropping route over every token of a call: `generate` recomputes
    each prompt of a batch on its own, so the degeneration check decodes them together (before,
    together they continued otherwise than each alone, and the check decoded one at a time)."""
    from moelab.eval.evaluate import LoadedLM, _degeneration

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, max_seq_len=64, allow_noncausal_routing=True,
                      moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2, **moe))  # fmt: skip
    model = MoETransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
    lm = LoadedLM(save_pretrained(model, tmp_path / "m"))
    prompts = torch.randint(0, 512, (4, 6), generator=torch.Generator().manual_seed(0))
    alone = [lm.generate(p[None], 10)[0].tolist() for p in prompts]
    together = model.generate(prompts, 10, greedy=True)[:, 6:]
    with torch.no_grad():  # what generate did before: the batch's prefix recomputed as one call
        ids = prompts
        for _ in range(10):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ids[:, 6:].tolist() != alone, "the batch routes otherwise as one call"
    assert together.tolist() == lm.generate(prompts, 10).tolist() == alone
    calls = []
    generate = lm.generate
    monkeypatch.setattr(lm, "generate", lambda ids, n: calls.append(ids.tolist()) or generate(ids, n))
    got = _degeneration(lm, [("a", p[None]) for p in prompts], EvalOptions(gen_tokens=10), quiet=True)
    assert calls == [prompts.tolist()]
    assert got["degenerate"] == sum(is_degenerate(tokens) for tokens in alone)


def test_a_prompt_and_continuation_that_fill_the_context_exactly_are_run(model_dir):
    """prompt_tokens + gen_tokens = the context (64) fits; one more is refused."""
    from dataclasses import replace

    options = replace(SMALL, domains=["code"], eval_tokens=32, prompt_tokens=32, gen_tokens=32)
    report = evaluate(model_dir, options=options, quiet=True)
    assert report["generation"]["prompts"] == 1
    with pytest.raises(ValueError, match="exceed the context of 64 tokens"):
        evaluate(model_dir, options=replace(options, gen_tokens=33), quiet=True)


def test_a_domain_loss_past_exp_s_range_has_evaluate_s_capped_perplexity():
    """A broken model's loss of 710 nats overflowed math.exp (OverflowError in the demo's table);
    the perplexity is capped at e^700 as `evaluate` reports it."""
    from moelab.eval import DomainLoss

    assert DomainLoss(loss=710.0, tokens=3).perplexity == math.exp(700)
    assert DomainLoss(loss=2.0, tokens=3).perplexity == math.exp(2.0)
