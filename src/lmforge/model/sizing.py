"""Model sizing: the depth dial that sets every dimension, and the one source of truth for parameter counts
and FLOPs per token.

One integer, depth, picks the model (as in nanochat): width grows with depth at a fixed aspect ratio, heads have
a fixed size, and the SwiGLU MLP keeps Llama's 8/3 expansion. Every count here is closed-form and a test pins it
to the parameters of an actual Transformer.
"""

from lmforge.model.transformer import TransformerShape


def shape_from_depth(
    depth: int,
    vocab_size: int,
    seq_len: int,
    *,
    aspect_ratio: int = 64,  # d_model = depth * 64: depth 12 is GPT-2 small's 768 wide (nanochat's dial)
    head_dim: int = 64,
    kv_group: int = 2,  # query heads per key/value head; 1 is plain multi-head attention
    mlp_multiple: int = 64,  # d_ff is rounded up to a multiple of this for efficient matmuls
    qk_norm: bool = True,
    tie_embeddings: bool = False,
    rope_theta: float = 10000.0,
) -> TransformerShape:
    """The model shape for a given depth: d_model = depth * aspect_ratio, n_head = d_model // head_dim."""
    for name, value in (("depth", depth), ("vocab_size", vocab_size), ("seq_len", seq_len),
                        ("aspect_ratio", aspect_ratio), ("head_dim", head_dim), ("kv_group", kv_group),
                        ("mlp_multiple", mlp_multiple)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    d_model = depth * aspect_ratio
    if d_model % head_dim != 0:
        raise ValueError(
            f"width {d_model} (depth {depth} x aspect_ratio {aspect_ratio}) is not a multiple of head_dim "
            f"{head_dim}; pick an aspect_ratio that is a multiple of head_dim, or a head_dim that divides {d_model}"
        )
    n_head = d_model // head_dim
    # the largest head count <= n_head // kv_group that divides n_head (e.g. 10 heads, group 3 -> 2 kv heads)
    n_kv_head = max(1, n_head // kv_group)
    while n_head % n_kv_head != 0:
        n_kv_head -= 1
    d_ff = -(-8 * d_model // (3 * mlp_multiple)) * mlp_multiple  # ceil(8/3 * d_model) to a multiple
    return TransformerShape(
        vocab_size=vocab_size,
        n_layer=depth,
        d_model=d_model,
        n_head=n_head,
        n_kv_head=n_kv_head,
        head_dim=head_dim,
        d_ff=d_ff,
        max_seq_len=seq_len,
        rope_theta=rope_theta,
        qk_norm=qk_norm,
        tie_embeddings=tie_embeddings,
    )


def count_params(shape: TransformerShape) -> dict[str, int]:
    """Parameter counts by part.

    total: every parameter (a tied embedding counted once) = sum(p.numel() for p in model.parameters())
    embedding: the token embedding table
    lm_head: the output projection, 0 when tied to the embedding
    non_embedding: total - embedding - lm_head (the blocks and final norm; Kaplan et al.'s N)
    matmul: weights used in a matmul per token: blocks' projections plus the lm_head even when tied
            (the N of the 6N FLOPs rule; norm gains and the embedding lookup do no matmul)
    """
    C, D, F = shape.d_model, shape.head_dim, shape.d_ff
    attn = C * (shape.n_head + 2 * shape.n_kv_head) * D + shape.n_head * D * C  # qkv + o_proj
    mlp = 3 * C * F  # gate, up, down
    norms = 2 * C + (2 * D if shape.qk_norm else 0)  # attn_norm, mlp_norm (+ q_norm, k_norm)
    blocks = shape.n_layer * (attn + mlp + norms)
    embedding = shape.vocab_size * C
    lm_head = 0 if shape.tie_embeddings else shape.vocab_size * C
    non_embedding = blocks + C  # + final norm
    return {
        "total": embedding + lm_head + non_embedding,
        "embedding": embedding,
        "lm_head": lm_head,
        "non_embedding": non_embedding,
        "matmul": shape.n_layer * (attn + mlp) + shape.vocab_size * C,
    }


def flops_per_token(shape: TransformerShape, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's convention (Chowdhery et al. 2022, appendix B):
    6 * N_matmul + 12 * n_layer * n_head * head_dim * seq_len.

    The attention term counts the full T x T score and value matmuls, not the causal half (as PaLM and nanochat
    do), so MFU figures compare with theirs.
    """
    n_matmul = count_params(shape)["matmul"]
    return 6.0 * n_matmul + 12.0 * shape.n_layer * shape.n_head * shape.head_dim * seq_len


def forward_flops_per_token(shape: TransformerShape, seq_len: int) -> float:
    """Inference (forward-only) FLOPs per token: a third of the training figure."""
    return flops_per_token(shape, seq_len) / 3.0


def describe(shape: TransformerShape) -> str:
    """One line, e.g. '4 layers x 256 wide, 4 heads / 2 kv heads of 64, ff 704, vocab 4096, ctx 256, qk-norm,
    untied: 5.05M params (2.95M non-embedding)'."""
    counts = count_params(shape)
    return (
        f"{shape.n_layer} layers x {shape.d_model} wide, {shape.n_head} heads / {shape.n_kv_head} kv heads of "
        f"{shape.head_dim}, ff {shape.d_ff}, vocab {shape.vocab_size}, ctx {shape.max_seq_len}, "
        f"{'qk-norm' if shape.qk_norm else 'no qk-norm'}, {'tied' if shape.tie_embeddings else 'untied'}: "
        f"{counts['total'] / 1e6:.2f}M params ({counts['non_embedding'] / 1e6:.2f}M non-embedding)"
    )
