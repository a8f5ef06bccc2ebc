"""GPU-only checks: bf16 autocast + torch.compile training, the GPU path of the trainer. Skipped without CUDA."""

import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.model.sizing import shape_from_depth
from lmforge.model.transformer import Transformer
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
