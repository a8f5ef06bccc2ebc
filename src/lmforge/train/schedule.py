"""Warm-up-stable-decay learning-rate schedule.

Progress is a number in [0, 1]: how far the run is toward whichever stop limit (steps, tokens, FLOPs, time) it
will reach first. That lets one schedule serve every kind of budget without knowing the step count in advance.
"""

from __future__ import annotations


def lr_multiplier(step: int, progress: float, *, warmup_steps: int, decay_frac: float, min_lr_frac: float) -> float:
    """Multiplier on each group's peak learning rate for the step about to run (step counts from 0)."""
    # 1. warm-up: linear from 1/warmup_steps to 1 over the first warmup_steps steps
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # 2. stable: the peak until the decay phase begins
    decay_start = 1.0 - decay_frac
    if progress < decay_start or decay_frac == 0.0:
        return 1.0
    # 3. decay: linear from the peak to min_lr_frac over the last decay_frac of the run
    into_decay = min(1.0, (progress - decay_start) / decay_frac)
    return 1.0 - (1.0 - min_lr_frac) * into_decay
