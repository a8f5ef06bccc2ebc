"""GPU-only checks: bf16 autocast + torch.compile training, the GPU path of the trainer, and the serving engine's
decode step replayed as CUDA graphs (one step, bursts of greedy steps, compiled). Skipped without CUDA."""

import pytest
import torch
from conftest import run_subprocess

from lmforge.checkpoint import resolve_checkpoint
from lmforge.config import TrainConfig
from lmforge.model.sizing import shape_from_depth
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import DecodeGraphs, Engine, EngineConfig, SamplingParams
from lmforge.train.optim import build_optimizers
from lmforge.train.runtime import prepare_model, setup_runtime

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_compiled_training_learns_a_batch():
    runtime = setup_runtime(TrainConfig(device="cuda", deterministic=False))
    assert runtime.dtype == "bf16" and runtime.compile
    torch.manual_seed(0)
    model = Transformer(shape_from_depth(2, 512, 64))
    step_model = prepare_model(model, runtime)
    optimizers = build_optimizers(model, TrainConfig(), "cuda")
    x = torch.randint(0, 512, (8, 64), device="cuda")
    losses = []
    for _ in range(30):
        with runtime.autocast():
            loss = step_model(x, x.roll(-1, dims=1))
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- serving: the decode step as CUDA graphs -----------------------------------------------------------------

NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
PROMPTS = [f"def {a}_{b}(" for a in NAMES for b in NAMES]  # 64


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full precision (a training run in this process may have turned TF32 on)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def serve_checkpoint(prepared):
    """A tiny run trained on the CPU in a subprocess: training in this process would leave its global torch
    settings behind (deterministic algorithms, which CUDA matmuls then refuse)."""
    workspace, data = prepared
    result = run_subprocess(workspace, "train", *data, "--name", "gpu-serve", "--train.max_steps", "40",
                            "--train.device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    return resolve_checkpoint("gpu-serve", workspace / "runs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cuda_graph_step_matches_the_eager_step_and_leaves_other_rows_alone(dtype, exact_fp32):
    torch.manual_seed(0)
    model = Transformer(shape_from_depth(2, 512, 64, head_dim=32)).to("cuda", dtype).eval()
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    with torch.inference_mode():
        cache = model.new_kv_cache(8)
        graphs = DecodeGraphs(model, cache, vocab=500, shortest=16)
        assert graphs.capture() > 0
        assert sorted(graphs.graphs) == [(b, n, 1, False) for b in (1, 2, 4, 8) for n in (16, 32, 64)]
        cache.k.normal_()  # after the capture, whose warm-up writes position 0 of every row
        cache.v.normal_()
        before = cache.k.clone()
        eager_cache = model.new_kv_cache(8)
        eager_cache.k.copy_(cache.k)
        eager_cache.v.copy_(cache.v)
        eager = DecodeGraphs(model, eager_cache, vocab=500, shortest=16)  # never captured: runs eagerly
        steps = [([5, 9, 11], [3, 40, 1]), ([7], [63]), (list(range(8)), list(range(0, 64, 8))), ([1, 2], [17, 2])]
        for i, (tokens, positions) in enumerate(steps):
            logits, argmax = graphs.step(tokens, positions)
            want, want_argmax = eager.step(tokens, positions)
            torch.testing.assert_close(logits, want, **tolerance)
            if dtype == torch.float32:
                assert argmax.tolist() == want_argmax.tolist() == want.argmax(dim=-1).tolist()
            torch.testing.assert_close(cache.k, eager_cache.k, **tolerance)
            torch.testing.assert_close(cache.v, eager_cache.v, **tolerance)
            if i == 0:  # 3 rows padded to 4: row 3 writes its own position 0 alone, rows 4.. nothing
                changed = (cache.k != before).any(dim=(0, 2, 4))  # (rows, positions)
                assert [changed[r].nonzero().flatten().tolist() for r in range(4)] == [[3], [40], [1], [0]]
                assert not changed[4:].any()


def run_all(engine: Engine, prompts: list[str], params: list[SamplingParams]) -> list[list[int]]:
    handles = [engine.submit(p, q) for p, q in zip(prompts, params)]
    return [h.result(timeout=120).token_ids[0] for h in handles]


def mixed_params(engine: Engine) -> list[SamplingParams]:
    """One request per prompt: greedy ones that end at max_tokens (1 to 31), at a stop string and at the end of
    the context, next to a penalised and a sampled one."""
    to_the_end = engine.context_len - len(engine.tokenizer.encode(PROMPTS[3]))
    params = [SamplingParams(max_tokens=1 + 3 * (i % 11), temperature=0, ignore_eos=True) for i in range(64)]
    params[3] = SamplingParams(max_tokens=to_the_end, temperature=0, ignore_eos=True)
    params[4] = SamplingParams(max_tokens=30, temperature=0, stop=(")", "\n"))
    params[5] = SamplingParams(max_tokens=12, temperature=0, frequency_penalty=1.5)  # greedy, penalised
    params[7] = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, logprobs=2)  # sampled, seeded
    return params


@pytest.mark.parametrize("steps, compiled, speculate", [(1, False, 0), (4, True, 0), (4, True, 3)],
                         ids=["one-step", "compiled-bursts-of-4", "compiled-speculative-bursts-of-4"])
def test_cuda_graphs_decode_greedy_as_eager_and_as_alone(serve_checkpoint, exact_fp32, steps, compiled, speculate):
    """fp32, so that the padded batch's other matmul kernels cannot tip a near-tie; 24 rows: batches 1..24 pad to
    1, 2, 4, 8, 16, 24 as requests finish and queued ones join mid-batch. With --decode-steps 4 --compile on, a
    graph also holds 4 compiled steps, each fed the last one's argmax on the device (the penalised and sampled
    requests make the batch fall back to one step at a time while they run); with --speculate 3 as well, graphs
    of 4 speculative steps, each feeding 3 drafted tokens, for requests running alone (one compile of the
    speculative step)."""
    config = {"max_concurrency": 24, "max_queue": 256, "device": "cuda", "dtype": "fp32"}
    eager = Engine.from_checkpoint(serve_checkpoint, EngineConfig(**config, cuda_graphs=False)).start()
    graphed = Engine.from_checkpoint(serve_checkpoint, EngineConfig(**config, decode_steps=steps, compile=compiled,
                                                                    speculate=speculate, speculate_max_batch=1))
    assert eager.decode_graphs is None and graphed.graph_seconds > 0
    assert sorted(graphed.decode_graphs.graphs) == sorted(  # context 64: one length; speculating at batch 1
        [(b, 64, k, False) for b in (1, 2, 4, 8, 16, 24) for k in {1, steps}] +
        ([(1, 64, steps, True)] if speculate else []))
    graphed.start()
    params = mixed_params(eager)
    try:
        alone = [eager.generate(p, q).token_ids[0] for p, q in zip(PROMPTS, params)]
        assert [graphed.generate(p, q).token_ids[0] for p, q in zip(PROMPTS, params)] == alone
        assert run_all(graphed, PROMPTS, params) == alone
        if steps == 1:
            assert run_all(eager, PROMPTS, params) == alone
            # graphs at several attended lengths (16, 32, 64), captured while no row holds a sequence
            graphs = DecodeGraphs(graphed.model, graphed.cache, graphed.vocab, shortest=16)
            with torch.inference_mode():
                graphs.capture()
            graphed.decode_graphs = graphs
            assert run_all(graphed, PROMPTS, params) == alone
    finally:
        eager.stop()
        graphed.stop()
    if speculate:
        assert graphed.metrics.speculated.labels("accepted")._value.get() > 0
