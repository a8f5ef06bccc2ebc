"""Prompt-lookup speculation for greedy decoding: guess the next tokens from the sequence itself, check them all in
one forward pass, keep the ones the model agrees with.

A small model's decode step costs about the same for a few tokens per row as for one: it is launch- and
overhead-bound, not arithmetic-bound. So each step feeds a row its last token followed by `k` drafted ones. The
draft is what followed the latest earlier occurrence of the row's last 1-3 tokens, in its prompt or in what it has
generated (as vLLM's n-gram speculator and HF's `prompt_lookup_num_tokens`). The forward's argmax at each of the
k + 1 positions is the greedy token there; drafts are accepted while they equal it, so a step emits 1 to k + 1
tokens, the tokens one-token steps would have produced: speculation changes the speed, not the text. Up to
rounding, as with batching: a forward of k + 1 tokens per row rounds differently from one of 1, so where two
logits tie within rounding the argmax may go the other way. In fp32 every test prompt agrees; in bf16 (the GPU's
default) one of ten demo prompts diverged within 80 tokens in a review's check on a CPU.

Everything here is tensors on the device with fixed shapes, with no host round trip: the steps of a burst run
back to back inside one CUDA graph (serve/engine.py, DecodeGraphs), and the drafting and the bookkeeping compile
into a few kernels (torch.compile) beside the forward.
"""

from __future__ import annotations

import torch

from lmforge.model.transformer import KVCache, Transformer

LONGEST_MATCH = 3  # the drafts follow the latest earlier occurrence of the row's last 3 tokens, else 2, else 1


def draft_tokens(history: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """k drafted tokens per row (B, k).

    history (B, W): each row's token at each position, known through positions[b] (the row's last token, which the
    step feeds). The draft starts where the row's last tokens occurred before: the longest match (up to
    LONGEST_MATCH tokens), the latest among those. Past the row's last token it repeats the matched stretch, which
    continues a loop like `_C_C_C`. A row with no match drafts the start of its history, which costs nothing
    extra: the step runs k + 1 positions anyway.
    """
    B, W = history.shape
    last = positions[:, None]  # (B, 1)
    starts = torch.arange(W, device=history.device)  # (W,) s: where a draft would begin
    run = torch.ones(B, W, dtype=torch.bool, device=history.device)
    matched = torch.zeros(B, W, dtype=torch.long, device=history.device)  # (B, W) tokens matched before s
    for i in range(LONGEST_MATCH):
        before = torch.roll(history, 1 + i, dims=1)  # before[:, s] = history[:, s - 1 - i] (wrapped where s <= i)
        latest = history.gather(1, (last - i).clamp(min=0))  # (B, 1) the row's token i places before its last
        run = run & (before == latest) & (starts >= 1 + i) & (last >= i)
        matched = matched + run
    score = torch.where((matched > 0) & (starts <= last), matched * W + starts, -1)  # longest, then latest
    begin = score.argmax(dim=1, keepdim=True)  # (B, 1)
    offsets = torch.arange(k, device=history.device) % (last + 1 - begin)  # (B, k) wraps at the row's last token
    return history.gather(1, begin + offsets)


def propose_and_verify(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, history: torch.Tensor,
                       out: torch.Tensor, count: torch.Tensor, view: KVCache, vocab: int, k: int) -> torch.Tensor:
    """One speculative step for rows at their own positions; returns how far each row advanced (B,).

    tokens (B,) each row's last token, at positions (B,); history (B, W) as draft_tokens reads it; out (B, N) the
    tokens the burst emitted so far, count (B,) how many. The forward stages the keys and values of the k + 1 fed
    positions in `view` (the caller commits them at `positions`, then adds the advance to `positions`). Updated in
    place: tokens (the next one to feed), history and out (the emitted tokens appended), count.

    Keys and values of rejected drafts are committed too. They lie past the row's new position, where the next
    step overwrites them before anything reads them, as with any padding.
    """
    draft = draft_tokens(history, positions, k)  # (B, k)
    fed = torch.cat((tokens[:, None], draft), dim=1)  # (B, k + 1)
    logits = model(fed, kv_cache=view, start_pos=positions)[..., :vocab]  # (B, k + 1, V)
    greedy = logits.argmax(dim=-1)  # (B, k + 1) the greedy token after each fed one
    accepted = (draft == greedy[:, :k]).long().cumprod(dim=1).sum(dim=1)  # (B,) drafts the model agrees with
    advance = accepted + 1  # and the token after the last accepted one
    span = torch.arange(k + 1, device=fed.device)
    # all k + 1 are written; those past the advance are overwritten by the next step (or never read)
    history.scatter_(1, positions[:, None] + 1 + span, greedy)
    out.scatter_(1, count[:, None] + span, greedy)
    count += advance
    tokens.copy_(greedy.gather(1, accepted[:, None])[:, 0])
    return advance


def compiled_propose_and_verify():
    """propose_and_verify under torch.compile with dynamic shapes, without Inductor's memory-coalescing analysis of
    its Triton kernels, which asserts on this function's dynamic shapes on CUDA (torch 2.11)."""
    return torch.compile(propose_and_verify, dynamic=True, options={"triton.coalesce_tiling_analysis": False})
