"""The decode step at fixed shapes (DecodeGraphs) on a CPU: bucket choice, padding rows that touch no live row, and
an engine running it that answers exactly as the plain engine. The same step captured as CUDA graphs is checked in
test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint import resolve_checkpoint
from lmforge.model.sizing import shape_from_depth
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import (
    DecodeGraphs,
    Engine,
    EngineConfig,
    SamplingParams,
    attend_lengths,
    padded_batch_sizes,
)

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
