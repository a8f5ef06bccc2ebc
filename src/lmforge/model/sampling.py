"""Token sampling for `lmforge generate` and the server: temperature, top-k and top-p (nucleus) sampling over a
model's logits, and a streaming generate loop that prefills the prompt once and then decodes one token per step
through the KV cache.
"""

from collections.abc import Iterable, Iterator

import torch

from lmforge.model.transformer import KVCache, Transformer


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the bad sampling setting."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}; use 0 for greedy decoding")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}; use None to keep every token")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; use None or 1.0 to keep every token")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Draw one token id per row of logits (B, V) -> (B,). temperature 0 means greedy (argmax).

    The steps, in the usual order: 1) divide by temperature, 2) keep the top_k largest logits, 3) keep the
    smallest set of tokens whose probability mass reaches top_p, 4) sample from what is left.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)

    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p; the most likely token always stays
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[..., 0] = False  # (a top_p below float32's resolution would otherwise drop every token)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def generate(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
) -> Iterator[int]:
    """Stream up to max_new_tokens new token ids continuing prompt_ids.

    Stops early at a token in stop_ids (which is not yielded) or when the context is full: a model with context M
    can add at most M - len(prompt_ids) + 1 tokens. seed makes sampling reproducible; without it the global torch
    RNG is used. Arguments are checked at the call, before the first token is asked for. The model is only read,
    never switched between train and eval mode (it has no dropout).
    """
    context = model.shape.max_seq_len
    if len(prompt_ids) == 0:
        raise ValueError("prompt is empty; give at least one token (e.g. the tokenizer's beginning-of-text id)")
    if len(prompt_ids) > context:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens but the context is {context}; shorten the prompt "
            "or use a model trained with a longer context"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if min(prompt_ids) < 0 or max(prompt_ids) >= model.shape.vocab_size:
        raise ValueError(
            f"prompt token ids must lie in 0..{model.shape.vocab_size - 1} (the model's vocabulary), got "
            f"{min(prompt_ids)}..{max(prompt_ids)}; encode the prompt with the model's own tokenizer"
        )
    check_sampling(temperature, top_k, top_p)
    stop = frozenset(stop_ids)
    device = model.embed.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def next_token(kv_cache: KVCache, ids: list[int], start_pos: int) -> int:
        # inference mode per call, never across a yield, so the caller's code between tokens keeps its own mode
        with torch.inference_mode():
            idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
            logits = model(idx, kv_cache=kv_cache, start_pos=start_pos, last_only=True)[:, -1, :]  # (1, V)
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return int(token.item())

    def stream() -> Iterator[int]:
        if max_new_tokens == 0:
            return
        kv_cache = model.new_kv_cache(batch_size=1, max_len=min(context, len(prompt_ids) + max_new_tokens))
        # 1) prefill the whole prompt at once, 2) feed back one token per step until a stop token, the token
        # budget or the end of the context
        token, pos = next_token(kv_cache, prompt_ids, start_pos=0), len(prompt_ids)
        for produced in range(1, max_new_tokens + 1):
            if token in stop:
                return
            yield token
            if produced == max_new_tokens or pos == context:
                return
            token, pos = next_token(kv_cache, [token], start_pos=pos), pos + 1

    return stream()
