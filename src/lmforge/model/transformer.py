"""The lmforge language model: a decoder-only transformer, all of it in this one file.

The architecture is Llama's (pre-norm RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases),
with Qwen3's optional per-head RMSNorm on queries and keys ("QK-norm"). The code follows Karpathy's nanoGPT
model.py in spirit: single-device, read top to bottom. Precision (autocast), torch.compile and any parallelism are
applied by the trainer from outside; nothing here depends on them.

References:
1) Llama: https://github.com/meta-llama/llama/blob/main/llama/model.py and Hugging Face modeling_llama.py
2) Qwen3 (QK-norm): Hugging Face transformers models/qwen3/modeling_qwen3.py
3) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py

Mapping to Hugging Face: a shape with qk_norm=False is a LlamaForCausalLM, qk_norm=True a Qwen3ForCausalLM, with
config hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layer, num_attention_heads=n_head,
num_key_value_heads=n_kv_head, head_dim, max_position_embeddings=max_seq_len, rope_theta, rms_norm_eps=norm_eps,
tie_word_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu". Weights map 1:1 by renaming, with no
q/k permutation because the rotary embedding uses HF's rotate-half layout:
    embed.weight                              -> model.embed_tokens.weight
    blocks.{i}.attn_norm.weight               -> model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.{q,k,v,o}_proj.weight     -> model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    blocks.{i}.attn.{q,k}_norm.weight         -> model.layers.{i}.self_attn.{q,k}_norm.weight  (Qwen3 only)
    blocks.{i}.mlp_norm.weight                -> model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.{gate,up,down}_proj.weight -> model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                               -> model.norm.weight
    lm_head.weight                            -> lm_head.weight  (the embedding itself when tied)
q/k/v and gate/up stay separate matmuls, as in HF: fusing each into one wide matmul measured no faster on a 2-core
CPU (torch 2.13, eager and compiled), and the split it needs costs a copy in backward. Serving, where a decode step
is a few dozen tiny kernels, fuses them after loading (`Transformer.fuse_projections`).

Shape letters: B batch, T time (new tokens), S attended positions (cache), C d_model, H query heads,
K key/value heads, D head_dim, F d_ff, V vocab.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.loss import linear_cross_entropy


@dataclass
class TransformerShape:
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int  # grouped-query attention: every n_head // n_kv_head query heads share one key/value head
    head_dim: int  # explicit, as in HF Qwen3/Llama configs; n_head * head_dim need not equal d_model
    d_ff: int  # SwiGLU hidden width
    max_seq_len: int
    rope_theta: float = 10000.0  # Llama 2's base; plenty for the contexts (<= a few thousand) we train
    qk_norm: bool = True  # Qwen3's per-head RMSNorm on q and k: bounded attention logits, steadier at high LR
    tie_embeddings: bool = False
    norm_eps: float = 1e-6  # HF LlamaConfig / Qwen3Config default

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}; "
                "choose n_kv_head dividing n_head"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"rope_theta and norm_eps must be positive, got {self.rope_theta} and {self.norm_eps}")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain, as HF LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under autocast q and k arrive in bf16: cast the gain to match rather than upcast the activations
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


class Rotary(nn.Module):
    """Rotary position embedding in HF's rotate-half layout: dims i and i + D/2 form one rotating pair."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (D/2,)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (max_seq_len, D/2)
        # HF computes x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1); we fold the sign into
        # sin, cat(-sin, sin), and swap the halves without negating: the same numbers, one op fewer.
        # Non-persistent: derived from the shape, so checkpoints do not carry them.
        self.register_buffer("cos", torch.cat((angles.cos(), angles.cos()), dim=-1), persistent=False)  # (., D)
        self.register_buffer("sin", torch.cat((-angles.sin(), angles.sin()), dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, n, D) for any head count n; positions (B, T) when rows sit at different positions
        T = x.size(1)
        if positions is None:
            cos = self.cos[start_pos : start_pos + T, None, :].to(x.dtype)  # (T, 1, D)
            sin = self.sin[start_pos : start_pos + T, None, :].to(x.dtype)
        else:
            cos = self.cos[positions][:, :, None, :].to(x.dtype)  # (B, T, 1, D)
            sin = self.sin[positions][:, :, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (B, T, n, D/2) each
        return x * cos + torch.cat((x2, x1), dim=-1) * sin


class KVCache:
    """Pre-allocated keys and values for incremental decoding: (n_layer, B, K, max_len, D) each.

    Row b holds one sequence. With an int start_pos every row is at the same position (plain generation), and the
    forward pass writes the new keys and values itself. With a (B,) tensor of start positions each row is at its
    own (continuous batching, where sequences join and leave a running batch): the pass only reads the cache and
    stages its new keys and values, and the caller writes them with `commit(start_pos)`. A pass that never writes
    its inputs is one torch.compile traces without copying the cache. `attend_len` bounds the cached positions
    such a pass reads (the furthest row start; default all); `rows(a, b)` is a view of rows a..b-1.
    """

    attend_len: int | None = None

    def __init__(
        self, shape: TransformerShape, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ):
        size = (shape.n_layer, batch_size, shape.n_kv_head, max_len, shape.head_dim)
        self.k = torch.zeros(size, device=device, dtype=dtype)
        self.v = torch.zeros(size, device=device, dtype=dtype)
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def rows(self, start: int, stop: int) -> "KVCache":
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.staged = self.k[:, start:stop], self.v[:, start:stop], {}
        return view

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at positions start_pos.. and return all keys/values so far (B, K, S, D)."""
        end = start_pos + k.size(2)
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values (B, K, S, D) a pass with per-row positions reads, S = attend_len."""
        end = self.max_len if self.attend_len is None else self.attend_len
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.staged[layer] = (k, v)  # (B, K, T, D) each

    def commit(self, start_pos: torch.Tensor) -> None:
        """Write the staged keys and values of the last pass at each row's positions start_pos[b] + 0..T-1."""
        if not self.staged:
            return
        B, _, T, _ = next(iter(self.staged.values()))[0].shape  # every layer stages the same (B, K, T, D)
        device = self.k.device
        positions = start_pos.to(device)[:, None] + torch.arange(T, device=device)  # (B, T)
        rows = torch.arange(B, device=device)[:, None]  # (B, 1)
        for layer, (k, v) in self.staged.items():
            self.k[layer].transpose(1, 2)[rows, positions] = k.transpose(1, 2)  # (B, T, K, D) into (B, S, K, D)
            self.v[layer].transpose(1, 2)[rows, positions] = v.transpose(1, 2)
        self.staged.clear()


@torch.no_grad()
def stacked(*layers: nn.Linear) -> nn.Linear:
    """One bias-free Linear computing what `layers` compute on the same input, their outputs side by side."""
    weight = torch.cat([layer.weight for layer in layers])  # (sum of out_features, in_features)
    fused = nn.Linear(weight.size(1), weight.size(0), bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(weight)
    return fused


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, rotary positions and optional QK-norm."""

    def __init__(self, shape: TransformerShape, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = shape.n_head, shape.n_kv_head, shape.head_dim
        self.q_proj = nn.Linear(shape.d_model, shape.n_head * shape.head_dim, bias=False)
        self.k_proj = nn.Linear(shape.d_model, shape.n_kv_head * shape.head_dim, bias=False)
        self.v_proj = nn.Linear(shape.d_model, shape.n_kv_head * shape.head_dim, bias=False)
        self.o_proj = nn.Linear(shape.n_head * shape.head_dim, shape.d_model, bias=False)
        self.q_norm = RMSNorm(shape.head_dim, shape.norm_eps) if shape.qk_norm else None
        self.k_norm = RMSNorm(shape.head_dim, shape.norm_eps) if shape.qk_norm else None
        self.qkv_proj: nn.Linear | None = None  # q_proj, k_proj and v_proj as one, after fuse_projections()

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj and v_proj by one qkv_proj holding their weights stacked (for inference)."""
        self.qkv_proj = stacked(self.q_proj, self.k_proj, self.v_proj)
        self.q_proj = self.k_proj = self.v_proj = None

    def forward(self, x: torch.Tensor, rotary: Rotary, start_pos: int, kv_cache: KVCache | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.size()
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_width = self.n_kv_head * self.head_dim
            q, k, v = self.qkv_proj(x).split((self.n_head * self.head_dim, kv_width, kv_width), dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, start_pos, positions), rotary(k, start_pos, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)

        # enable_gqa lets SDPA share each key/value head across its query group without materialising copies;
        # on CPU it measured faster than repeating k and v (flash kernel, torch 2.13). Plain multi-head
        # attention does not ask for it, so every SDPA backend stays eligible.
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif positions is not None:  # rows at their own positions (continuous batching)
            # each query sees its row's cached keys (those before the row's start) and the new keys up to its
            # own; the new keys are staged, not written (see KVCache). Written out rather than SDPA with a mask,
            # which on CPU costs ~30x more for one query per row. Queries are grouped per key/value head.
            k_old, v_old = kv_cache.read(self.layer)  # (B, K, S, D)
            kv_cache.stage(self.layer, k, v)
            G, K, S = self.n_head // self.n_kv_head, self.n_kv_head, k_old.size(2)
            q = q.reshape(B, K, G * T, self.head_dim)  # row g*T + t is query head g of the group, time t
            scale = self.head_dim**-0.5
            before_start = torch.arange(S, device=q.device) < positions[:, :1]  # (B, S)
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().repeat(G, 1)  # (G*T, T)
            old = ((q @ k_old.transpose(-1, -2)) * scale).masked_fill(~before_start[:, None, None, :], float("-inf"))
            new = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf"))  # (B, K, G*T, T)
            p = torch.cat((old, new), dim=-1).float().softmax(dim=-1).to(q.dtype)  # (B, K, G*T, S + T), fp32 sums
            y = p[..., :S] @ v_old + p[..., S:] @ v  # (B, K, G*T, D)
            y = y.view(B, self.n_head, T, self.head_dim)
        else:
            k, v = kv_cache.update(self.layer, start_pos, k, v)  # (B, K, S, D), S = start_pos + T
            if T == 1:  # decoding: the one new query sees every cached position
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            elif start_pos == 0:  # prefill: plain causal attention
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:  # a chunk after cached tokens: causal mask aligned to the bottom-right
                S = k.size(2)
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start_pos)  # (T, S)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.gate_proj = nn.Linear(shape.d_model, shape.d_ff, bias=False)
        self.up_proj = nn.Linear(shape.d_model, shape.d_ff, bias=False)
        self.down_proj = nn.Linear(shape.d_ff, shape.d_model, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # gate_proj and up_proj as one, after fuse_projections()

    def fuse_projections(self) -> None:
        """Replace gate_proj and up_proj by one gate_up_proj holding their weights stacked (for inference)."""
        self.gate_up_proj = stacked(self.gate_proj, self.up_proj)
        self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # (B, T, F) inside


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, shape: TransformerShape, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(shape.d_model, shape.norm_eps)
        self.attn = Attention(shape, layer)
        self.mlp_norm = RMSNorm(shape.d_model, shape.norm_eps)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor, rotary: Rotary, start_pos: int, kv_cache: KVCache | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary, start_pos, kv_cache, positions)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Transformer(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model)
        self.rotary = Rotary(shape.head_dim, shape.max_seq_len, shape.rope_theta)
        self.blocks = nn.ModuleList(Block(shape, layer) for layer in range(shape.n_layer))
        self.norm = RMSNorm(shape.d_model, shape.norm_eps)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, the two projections that write into the residual stream (o_proj,
        down_proj) scaled by 1/sqrt(2 * n_layer) so the stream's variance stays the same at any depth; norm gains 1.

        We keep every weight non-zero (unlike modded-nanogpt's zero-initialised projections) so that a tied
        embedding works, every parameter gets a gradient on the first step, and init matches HF's
        initializer_range=0.02 convention. Loss at init is close to ln(vocab_size).
        """
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.shape.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self) -> int:
        """Parameters in the module (a tied embedding counted once); equals sizing.count_params(shape)["total"]."""
        return sum(p.numel() for p in self.parameters())

    def fuse_projections(self) -> "Transformer":
        """For inference: q/k/v and gate/up each as one matmul, the same arithmetic in fewer, wider kernels. A
        decode step on a GPU is a few dozen kernels of a few microseconds each, so every one fewer counts. The
        separate layers go: call it after any change of device or dtype, and do not train or save the result (its
        state_dict no longer matches a checkpoint's)."""
        for block in self.blocks:
            block.attn.fuse_projections()
            block.mlp.fuse_projections()
        return self

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for up to max_len positions (default: the model's context) on the model's device/dtype."""
        max_len = self.shape.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.shape.max_seq_len:
            raise ValueError(
                f"KV cache length {max_len} is outside 1..{self.shape.max_seq_len} (the model's context); "
                "pass a smaller max_len"
            )
        weight = self.embed.weight
        return KVCache(self.shape, batch_size, max_len, torch.device(device or weight.device), dtype or weight.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        reduction: str = "mean",
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T), or the cross-entropy against targets (B, T).

        targets: next-token ids; positions equal to -100 are ignored. reduction="mean" returns a float32 scalar,
        "none" the float32 per-token losses (B, T) with 0 at ignored positions (for bits-per-byte evaluation).
        kv_cache/start_pos: incremental decoding; idx holds the tokens at positions start_pos.. start_pos+T-1.
            A (B,) tensor start_pos puts each row at its own position (continuous batching); rows shorter than T
            are padded at the end, and their padding is written to the cache where later tokens overwrite it.
        last_only: return logits for the last position only, (B, 1, V) (saves the lm_head over a long prompt).
        logits_at: (B,) index into T per row: return logits for that one position of each row, (B, 1, V)
            (the last real token of padded rows).
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, time >= 1; got {tuple(idx.shape)}")
        B, T = idx.size()
        positions = None
        if isinstance(start_pos, torch.Tensor):  # the caller keeps each row's positions below kv_cache.max_len
            if kv_cache is None or start_pos.shape != (B,):
                raise ValueError(f"per-row start positions need a kv_cache and shape ({B},), "
                                 f"got {tuple(start_pos.shape)}")
            positions = start_pos.to(idx.device)[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            start_pos = 0
        if start_pos + T > self.shape.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + T} tokens exceeds the model's context of {self.shape.max_seq_len}; "
                "shorten the input or train a model with a longer max_seq_len"
            )
        if kv_cache is None and start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a kv_cache holding the earlier positions")
        if kv_cache is not None and (kv_cache.batch_size != B or start_pos + T > kv_cache.max_len):
            raise ValueError(
                f"KV cache for batch {kv_cache.batch_size} x {kv_cache.max_len} positions cannot take batch {B} "
                f"at positions {start_pos}..{start_pos + T - 1}; make a larger cache with model.new_kv_cache"
            )
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.rotary, start_pos, kv_cache, positions)
        x = self.norm(x)

        if targets is None:
            if last_only:
                x = x[:, -1:, :]  # (B, 1, C)
            elif logits_at is not None:
                x = x[torch.arange(B, device=x.device), logits_at.to(x.device)][:, None, :]  # (B, 1, C)
            return self.lm_head(x)  # (B, T, V)
        if reduction == "mean" and torch.is_grad_enabled() and x.device.type == "cpu":
            # training on CPU: projection + loss fused in cache-sized chunks, never holding (B*T, V) logits
            # (model/loss.py); on GPU torch.compile fuses the plain path below into a few kernels instead
            return linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
        # .float() is a no-op in fp32 and upcasts autocast's bf16 logits for a stable loss
        logits = self.lm_head(x).view(B * T, -1)  # (B*T, V)
        loss = F.cross_entropy(logits.float(), targets.reshape(B * T), ignore_index=-100, reduction=reduction)
        return loss if reduction == "mean" else loss.view(B, T)
