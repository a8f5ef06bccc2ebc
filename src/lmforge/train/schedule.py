"""Warm-up-stable-decay learning-rate schedule, and when DiLoCo's sites exchange what they learned.

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


class SyncClock:
    """Which fragments of the model DiLoCo's sites exchange after each step, for `fragments` F and H = `every`.

    by="steps": fragment f at the steps s with s % H == f * H // F, so every H steps (DiLoCo's schedule).
    by="lr": fragment f once the learning-rate multipliers of the steps since its last exchange add up to H
    (the remainder carries over): H steps apart at the peak learning rate and farther apart in warm-up and decay,
    where each step moves the weights less. Each exchange then follows about the same drift of the sites, and the
    exchanges the low-rate steps no longer need go to the peak instead (Gu et al., "A Quadratic Synchronization
    Rule for Distributed Deep Learning", 2024, also sync less as the rate decays). The fragments start staggered
    as with "steps".
    """

    def __init__(self, every: int, fragments: int = 1, by: str = "steps"):
        self.every, self.by = every, by
        self.offsets = [f * every // fragments % every for f in range(fragments)]
        self.since = [float((every - offset) % every) for offset in self.offsets]  # by="lr": summed multipliers

    def due(self, step: int, lr_mult: float) -> list[int]:
        """The fragments to exchange after `step` (counted from 1), whose learning-rate multiplier was lr_mult."""
        if self.by == "steps":
            return [f for f, offset in enumerate(self.offsets) if step % self.every == offset]
        due = []
        for f in range(len(self.since)):
            self.since[f] += lr_mult
            if self.since[f] >= self.every - 1e-9:  # summed in floats: H steps at the peak must make H
                self.since[f] -= self.every
                due.append(f)
        return due

    def state_dict(self) -> dict:
        return {"since": list(self.since)}

    def load_state_dict(self, state: dict) -> None:
        self.since = list(state["since"])


def exchanges_in_run(steps: int, every: int, by: str, *, warmup_steps: int, decay_frac: float,
                     min_lr_frac: float, checkpoint_every: int = 0) -> int:
    """Whole-model exchanges in a run of `steps` steps (progress = step / steps): those the clock calls for, one
    for each checkpoint between them (by steps, checkpoints fall on exchanges), and the one that ends the run
    unless its last step had one."""
    if by == "steps":
        return -(-steps // every)
    clock, count = SyncClock(every, by=by), 0
    for step in range(1, steps + 1):
        mult = lr_multiplier(step - 1, (step - 1) / steps, warmup_steps=warmup_steps, decay_frac=decay_frac,
                             min_lr_frac=min_lr_frac)
        if clock.due(step, mult) or step == steps or checkpoint_every and step % checkpoint_every == 0:
            count += 1
    return count
