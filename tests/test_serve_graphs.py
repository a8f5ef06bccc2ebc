"""The decode step at fixed shapes (DecodeGraphs) on a CPU: bucket choice, padding rows that touch no live row, and
an engine running it that answers exactly as the plain engine. The same step captured as CUDA graphs is checked in
test_gpu.py."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import wait_until

from lmforge.checkpoint import resolve_checkpoint
from lmforge.errors import LmforgeError
from lmforge.model.sizing import shape_from_depth
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import (
    DecodeGraphs,
    Delta,
    Engine,
    EngineConfig,
    Finished,
    Prefilled,
    SamplingParams,
    attend_lengths,
    padded_batch_sizes,
    sequence_rows,
)
from lmforge.serve.speculation import draft_tokens, propose_and_verify

NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
PROMPTS = [f"def {a}_{b}(" for a in NAMES for b in NAMES[:3]]  # 24


def test_batch_sizes_and_lengths_cover_every_step():
    assert padded_batch_sizes(1) == [1]
    assert padded_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert padded_batch_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert attend_lengths(256) == [256]
    assert attend_lengths(2048) == [256, 512, 1024, 2048]
    assert attend_lengths(100, shortest=16) == [16, 32, 64, 100]

    model = Transformer(shape_from_depth(1, 64, 16, head_dim=16))  # context 16
    graphs = DecodeGraphs(model, model.new_kv_cache(6), vocab=64, shortest=4)
    assert graphs.batch_sizes == [1, 2, 4, 6] and graphs.lengths == [4, 8, 16]
    assert graphs.bucket(1, 1) == (1, 4)
    assert graphs.bucket(3, 4) == (4, 4)
    assert graphs.bucket(5, 5) == (6, 8)
    assert graphs.bucket(6, 15) == (6, 16)  # the furthest a decoding row gets: context - 1

    # speculative graphs at the padded sizes that cover --speculate-max-batch rows, where a burst fits the context
    speculating = [DecodeGraphs(model, model.new_kv_cache(6), vocab=64, steps=2, speculate=3, speculate_max_batch=n)
                   for n in (None, 0, 1, 3)]
    assert [(g.speculate, g.speculate_batches) for g in speculating] == \
        [(3, [1, 2, 4, 6]), (0, []), (3, [1]), (3, [1, 2, 4])]
    assert DecodeGraphs(model, model.new_kv_cache(6), vocab=64, steps=5, speculate=3).speculate == 0  # 20 > 16


def test_a_padded_step_matches_the_model_and_leaves_other_rows_alone():
    torch.manual_seed(0)
    model = Transformer(shape_from_depth(1, 64, 16, head_dim=16)).eval()
    cache = model.new_kv_cache(8)
    cache.k.normal_()
    cache.v.normal_()
    before_k, before_v = cache.k.clone(), cache.v.clone()
    graphs = DecodeGraphs(model, cache, vocab=60, shortest=4)
    tokens, positions = [5, 9, 11], [3, 7, 1]  # 3 rows pad to 4; the furthest at 7 attends over 8
    with torch.inference_mode():
        logits, argmax = graphs.step(tokens, positions)

        reference = model.new_kv_cache(3)
        reference.k.copy_(before_k[:, :3])
        reference.v.copy_(before_v[:, :3])
        start = torch.tensor(positions)
        want = model(torch.tensor(tokens)[:, None], kv_cache=reference, start_pos=start)[:, 0, :60].float()
        reference.commit(start)
    assert logits.shape == (3, 60) and argmax.tolist() == want.argmax(dim=-1).tolist()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k[:, :3], reference.k)  # live rows: written at their positions only
    torch.testing.assert_close(cache.v[:, :3], reference.v)
    changed = (cache.k != before_k).any(dim=(0, 2, 4))  # (rows, positions) written
    assert changed[3].nonzero().flatten().tolist() == [0]  # the padding row: only its own position 0
    assert not changed[4:].any()  # rows beyond the padded batch: untouched


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    workspace, name, _ = trained_run
    return resolve_checkpoint(name, workspace / "runs")


def run_all(engine: Engine, params: list[SamplingParams]) -> list[list[int]]:
    """Every prompt submitted at once with its own params (they finish at different steps and the queue refills
    freed rows, so batch sizes rise and fall); each one's token ids."""
    handles = [engine.submit(p, q) for p, q in zip(PROMPTS, params)]
    return [h.result(timeout=120).token_ids[0] for h in handles]


def test_an_engine_on_the_padded_step_answers_as_the_plain_engine(checkpoint):
    plain = Engine.from_checkpoint(checkpoint, EngineConfig(max_concurrency=6)).start()
    padded = Engine.from_checkpoint(checkpoint, EngineConfig(max_concurrency=6))
    # 6 rows (batches 1, 2, 4, 6) and lengths 8, 16, 32, 64 (the tiny model's context is 64)
    padded.decode_graphs = DecodeGraphs(padded.model, padded.cache, padded.vocab, shortest=8)
    padded.start()
    params = [SamplingParams(max_tokens=3 + 5 * (i % 7), temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    to_the_end = plain.context_len - len(plain.tokenizer.encode(PROMPTS[3]))
    params[3] = SamplingParams(max_tokens=to_the_end, temperature=0, ignore_eos=True)  # to the last length bucket
    params[5] = SamplingParams(max_tokens=12, temperature=0, frequency_penalty=1.5)  # greedy, penalised
    params[7] = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7)  # sampled, seeded
    try:
        assert run_all(padded, params) == run_all(plain, params)
        alone = [padded.generate(PROMPTS[i], params[i]).token_ids[0] for i in (0, 3, 6)]
        assert alone == [plain.generate(PROMPTS[i], params[i]).token_ids[0] for i in (0, 3, 6)]
    finally:
        plain.stop()
        padded.stop()
    assert padded.decode_graphs.graphs == {}  # a CPU captures nothing: every step ran eagerly


# ---- several greedy steps per scheduler step (--decode-steps) ------------------------------------------------

def test_steps_ahead_equal_single_steps_fed_their_argmax():
    torch.manual_seed(0)
    model = Transformer(shape_from_depth(1, 64, 16, head_dim=16)).eval()
    one, ahead = model.new_kv_cache(4), model.new_kv_cache(4)
    single = DecodeGraphs(model, one, vocab=60, shortest=4)
    burst = DecodeGraphs(model, ahead, vocab=60, steps=3, shortest=4)
    tokens, positions = [5, 9, 11], [3, 7, 1]
    want = []
    with torch.inference_mode():
        for k in range(3):
            _, argmax = single.step(tokens, [p + k for p in positions])
            tokens = argmax.tolist()
            want.append(tokens)
        assert burst.ahead([5, 9, 11], positions) == want
    torch.testing.assert_close(ahead.k[:, :3], one.k[:, :3])  # the same positions written, with the same keys
    torch.testing.assert_close(ahead.v[:, :3], one.v[:, :3])


def burst_params(engine: Engine) -> list[SamplingParams]:
    """Greedy requests that end inside a burst in every way (max_tokens, stop strings, the context's end, EOS),
    with n > 1, next to a penalised and a sampled one (while they run, the batch goes one token per step)."""
    params = [SamplingParams(max_tokens=1 + 5 * (i % 7), temperature=0, ignore_eos=i % 2 == 0)
              for i in range(len(PROMPTS))]
    params[3] = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)  # to the end of the context
    params[4] = SamplingParams(max_tokens=30, temperature=0, stop=(")", "\n"))
    params[6] = SamplingParams(max_tokens=9, temperature=0, n=3)
    params[8] = SamplingParams(max_tokens=12, temperature=0, presence_penalty=1.0)
    params[9] = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    params[10] = SamplingParams(max_tokens=20, temperature=0, logprobs=1)
    return params


@pytest.mark.parametrize("speculate", [0, 3], ids=["bursts", "speculative-bursts"])
@pytest.mark.parametrize("padded", [False, True], ids=["eager", "padded-step"])
def test_bursts_answer_as_one_step_at_a_time(checkpoint, padded, speculate):
    """Bursts of 4 greedy steps, or of 4 speculative steps feeding 3 drafted tokens per row each: the same texts,
    tokens, finish reasons and usage as one token per step, alone and batched."""
    config = {"max_concurrency": 6, "max_queue": 64}
    plain = Engine.from_checkpoint(checkpoint, EngineConfig(**config)).start()
    bursts = Engine.from_checkpoint(checkpoint, EngineConfig(**config, decode_steps=4, speculate=speculate,
                                                              speculate_max_batch=6))
    if padded:  # the graphs' path: whole bursts while every row has room for them
        bursts.decode_graphs = DecodeGraphs(bursts.model, bursts.cache, bursts.vocab, steps=4, shortest=8,
                                            speculate=speculate)
    bursts.start()
    params = burst_params(plain)
    try:
        def full(engine, prompt, q):
            r = engine.generate(prompt, q)
            return r.texts, r.token_ids, r.finish_reasons, r.usage.completion_tokens
        alone = [full(plain, p, q) for p, q in zip(PROMPTS, params)]
        assert [full(bursts, p, q) for p, q in zip(PROMPTS, params)] == alone
        assert alone[3][2] == ["length"] and alone[4][2] == ["stop"]
        handles = [bursts.submit(p, q) for p, q in zip(PROMPTS, params)]
        together = [h.result(timeout=120) for h in handles]
        assert [(r.texts, r.token_ids, r.finish_reasons) for r in together] == [a[:3] for a in alone]
    finally:
        plain.stop()
        bursts.stop()
    if speculate:
        drafted = bursts.metrics.speculated.labels("drafted")._value.get()
        assert 0 < bursts.metrics.speculated.labels("accepted")._value.get() < drafted


def test_decode_steps_out_of_range_is_refused():
    with pytest.raises(LmforgeError, match="--decode-steps must be between 1 and"):
        EngineConfig(decode_steps=0).validate()


def test_a_cancelled_request_frees_its_row_after_the_burst(checkpoint):
    engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_concurrency=2, decode_steps=8)).start()
    try:
        handle = engine.submit(PROMPTS[1], SamplingParams(max_tokens=55, temperature=0, ignore_eos=True))
        first = next(e for e in handle.events(timeout=30) if isinstance(e, Delta))
        handle.cancel()
        assert wait_until(lambda: engine.stats()["running"] == 0, seconds=2.0)
        assert engine.metrics.cancelled._value.get() == 1
        assert len(first.token_ids) == 1  # the prefill's token, alone; then bursts of up to 8
        finished = [e for e in handle.events(timeout=5) if isinstance(e, Finished)]
        assert finished and finished[0].usage.completion_tokens < 55
    finally:
        engine.stop()


def test_first_tokens_go_out_before_the_burst_that_follows_them(checkpoint):
    """A burst of decode steps takes a while: the prefill's tokens are delivered before it starts, so a new
    request's time to first token does not wait for it."""
    engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_concurrency=2, decode_steps=8))  # not started
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    delivered = []

    def decode() -> None:  # what the caller holds when the burst starts
        while (event := handle.poll()) is not None:
            delivered.append(event)
        engine._running.clear()

    engine._decode = decode
    with engine._wake:
        admitted = engine._admit()
    with torch.inference_mode():
        engine._step(admitted)
    assert [type(e) for e in delivered] == [Prefilled, Delta] and len(delivered[1].token_ids) == 1


# ---- prompt-lookup speculation (--speculate) --------------------------------------------------------------------

def test_drafts_follow_the_latest_longest_match_and_repeat_a_loop():
    history = torch.full((3, 16), 99)  # 99: positions past each row's last token, never read
    history[0, :12] = torch.tensor([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3])  # "1 2 3" twice before: the latest wins
    history[1, :6] = torch.tensor([8, 4, 6, 3, 2, 6])  # only "6" matches: what followed it, then that again
    history[2, :5] = torch.tensor([4, 5, 4, 5, 4])  # "4 5 4" at 0: then 5 4 and, past the last token, the loop
    drafts = draft_tokens(history, torch.tensor([11, 5, 4]), k=4)
    assert drafts.tolist() == [[7, 5, 1, 2], [3, 2, 6, 3], [5, 4, 5, 4]]


def test_speculative_steps_emit_exactly_the_greedy_tokens():
    torch.manual_seed(0)
    model = Transformer(shape_from_depth(1, 64, 16, head_dim=16)).eval()
    one, spec = model.new_kv_cache(4), model.new_kv_cache(4)
    single = DecodeGraphs(model, one, vocab=60, shortest=4)
    speculating = DecodeGraphs(model, spec, vocab=60, steps=2, speculate=3, shortest=4)
    tokens, positions = [5, 9, 11], [1, 3, 2]  # 3 rows pad to 4
    with torch.inference_mode():
        # the rows' earlier tokens, as history; the caches hold the keys and values of the same ones
        histories = [[7, 5], [1, 2, 1, 9], [3, 4, 11]]
        for cache in (one, spec):
            for i, h in enumerate(histories):
                model(torch.tensor([h[:-1]]), kv_cache=cache.rows(i, i + 1), start_pos=0)
        emitted = speculating.speculative(tokens, positions, histories)
        greedy, fed = [], tokens
        for k in range(2 * 4):  # the most two steps of 1 + 3 tokens can emit
            _, argmax = single.step(fed, [p + k for p in positions])
            fed = argmax.tolist()
            greedy.append(fed)
    assert all(2 <= len(e) <= 8 for e in emitted)
    assert any(len(e) > 2 for e in emitted)  # some draft was accepted (the random model repeats itself)
    for i, e in enumerate(emitted):
        assert e == [step[i] for step in greedy[: len(e)]]
        n = positions[i] + len(e)  # positions the row has cached correctly
        torch.testing.assert_close(spec.k[:, i, :, :n], one.k[:, i, :, :n])


def test_speculation_compiled_compiles_nothing_after_warm_up(checkpoint):
    plain = Engine.from_checkpoint(checkpoint, EngineConfig(max_concurrency=4)).start()
    compiled = Engine.from_checkpoint(checkpoint, EngineConfig(max_concurrency=4, compile=True, decode_steps=4,
                                                               speculate=3))
    compiled.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled.start()
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)  # long enough to repeat itself
    try:
        alone = [compiled.generate(p, params).token_ids for p in PROMPTS[:3]]
        together = [h.result(timeout=120).token_ids for h in [compiled.submit(p, params) for p in PROMPTS[3:7]]]
        assert alone + together == [plain.generate(p, params).token_ids for p in PROMPTS[:7]]
    finally:
        plain.stop()
        compiled.stop()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert compiled.metrics.speculated.labels("accepted")._value.get() > 0


def test_padded_steps_compile_one_version_for_one_row_and_one_for_more():
    """What a GPU server compiles at start: every padded batch size of DecodeGraphs, all the engine's rows
    included, runs on two versions of the compiled step and two of the speculative step (one row; more rows). Each
    version is 15-25 s of compiling on a GPU. Without the pool's spare row (a whole cache of 2 layers or more is
    contiguous where a view of fewer rows is not), or with input buffers whose row count the compiler ties to the
    first batch it traces, there are 6."""
    torch.manual_seed(0)
    model = Transformer(shape_from_depth(2, 64, 16, head_dim=16)).eval()
    # the versions are Dynamo's (its guards: sizes, strides, views); the eager backend spares the kernels' compile
    dynamo_only = functools.partial(torch.compile, dynamic=True, backend="eager")
    rows = sequence_rows(model, 8, torch.device("cpu"), torch.float32)  # as the engine makes them
    graphs = DecodeGraphs(model, rows, vocab=60, steps=2, shortest=16, forward=dynamo_only(model), speculate=2,
                          verify=dynamo_only(propose_and_verify))
    assert graphs.batch_sizes == [1, 2, 4, 8] and graphs.lengths == [16]
    torch._dynamo.reset()  # no versions left from other tests' models of the same class
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for batch in reversed(graphs.batch_sizes):  # the whole pool first, as DecodeGraphs.capture does
            for steps, speculative in ((1, False), (2, False), (2, True)):
                graphs._run(batch, 16, steps, speculative)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled == 4


def test_speculation_settings_out_of_range_are_refused():
    with pytest.raises(LmforgeError, match="--speculate must be between 0 and 16"):
        EngineConfig(speculate=17).validate()
    with pytest.raises(LmforgeError, match="--speculate-max-batch must be 0"):
        EngineConfig(speculate_max_batch=-1).validate()


def test_speculation_fits_its_steps_to_the_room_left_and_charges_what_each_request_used(checkpoint):
    """With the CLI's defaults (bursts of 16, 4 drafts: 80 positions) the tiny model's context of 64 has no room
    for a whole burst: without graphs the engine takes as many speculative steps as fit, up to the context's end.
    A request that ends early in a burst is charged the steps it needed, not the whole burst."""
    config = {"max_concurrency": 4, "decode_steps": 16}
    plain = Engine.from_checkpoint(checkpoint, EngineConfig(**config)).start()
    speculating = Engine.from_checkpoint(checkpoint, EngineConfig(**config, speculate=4)).start()
    assert speculating.speculates_up_to == 2  # auto on a CPU
    to_the_end = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    short, long = (SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (2, 50))
    try:
        for engine in (plain, speculating):
            assert engine.generate(PROMPTS[0], to_the_end).finish_reasons == ["length"]
        got = {}
        for name, engine in (("plain", plain), ("speculating", speculating)):
            handles = [engine.submit(PROMPTS[1], short), engine.submit(PROMPTS[2], long)]
            got[name] = [h.result(timeout=60) for h in handles]
        assert [r.token_ids for r in got["speculating"]] == [r.token_ids for r in got["plain"]]
        assert speculating.generate(PROMPTS[0], to_the_end).token_ids == plain.generate(PROMPTS[0], to_the_end).token_ids
    finally:
        plain.stop()
        speculating.stop()
    assert speculating.metrics.speculated.labels("accepted")._value.get() > 0
    # the short request: its prefill and one step of 5 tokens, against its prefill and one token
    assert got["speculating"][0].usage.flops < 2 * got["plain"][0].usage.flops
