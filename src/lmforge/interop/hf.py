"""Hugging Face transformers interop: an lmforge checkpoint as a LlamaForCausalLM / Qwen3ForCausalLM folder, and back.

Export writes what `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read, offline:

    OUT_DIR/
      config.json              LlamaConfig (qk_norm off) or Qwen3Config (qk_norm on), written by hand so that
                               exporting needs no transformers install; keys for transformers 4.x and 5.x
      generation_config.json   bos = <|endoftext|>, eos = <|endoftext|> and <|end|> (chat turns stop there)
      model.safetensors        the weights renamed (model/transformer.py gives the map; no q/k permutation),
                               a tied lm_head stored once as the embedding, as save_pretrained does
      tokenizer.json           the checkpoint's tokenizer, byte for byte
      tokenizer_config.json    PreTrainedTokenizerFast, its special tokens, and the checkpoint's chat template

Import reads such a folder (a local Llama- or Qwen3-architecture checkpoint) into an lmforge run folder with one
checkpoint at step 0 (fp32 weights), so generate, serve and fine-tuning take it like a trained run. Whatever our
model cannot compute exactly (biases, rope scaling, sliding windows, another activation, ...) is refused with an
error naming the feature. The tokenizer must be a byte-level BPE `tokenizer.json` (what `Tokenizer` decodes) with
an `<|endoftext|>` token: lmforge starts and ends documents with that one token, and a tokenizer without it
(e.g. Llama 3's, with separate begin/end tokens) is refused rather than given a silently different boundary.

Both directions write to a temporary folder and rename it into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from lmforge.atomic import fsync_path, replace_dir
from lmforge.checkpoint import CONFIG, META, load_model, read_meta, save_checkpoint, step_dir_name
from lmforge.config import ModelConfig, RunConfig, TokenizerConfig
from lmforge.data.chat import CHAT_TEMPLATE_FILE, DEFAULT_CHAT_TEMPLATE, END_OF_TURN
from lmforge.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.model.sizing import count_params
from lmforge.model.transformer import Transformer, TransformerShape

EOT = SPECIAL_TOKENS[0]  # "<|endoftext|>": document boundary, bos and eos
PAD = "<|pad|>"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # model_type -> class; qwen3 = QK-norm

# lmforge name -> HF name, outside the blocks and inside block i (model.layers.{i}.<name>)
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    **{f"attn.{p}.weight": f"self_attn.{p}.weight"
       for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")},
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"mlp.{p}.weight": f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
}
TOP_FROM_HF = {hf: ours for ours, hf in TOP_NAMES.items()}
BLOCK_FROM_HF = {hf: ours for ours, hf in BLOCK_NAMES.items()}


def hf_name(name: str) -> str:
    """The HF name of an lmforge parameter: blocks.3.attn.q_proj.weight -> model.layers.3.self_attn.q_proj.weight."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)  # blocks.{i}.<rest>
    return f"model.layers.{layer}.{BLOCK_NAMES[rest]}"


def lmforge_name(name: str) -> str | None:
    """The lmforge parameter name of an HF one; None for a weight our model has no place for (e.g. a bias)."""
    if name in TOP_FROM_HF:
        return TOP_FROM_HF[name]
    parts = name.split(".", 3)  # model.layers.{i}.<rest>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in BLOCK_FROM_HF:
        return f"blocks.{parts[2]}.{BLOCK_FROM_HF[parts[3]]}"
    return None


# -- export --------------------------------------------------------------------------------------------------------

def hf_config(shape: TransformerShape, dtype: str, bos_id: int, eos_id: int, pad_id: int | None) -> dict[str, Any]:
    """config.json for a LlamaForCausalLM (qk_norm False) or Qwen3ForCausalLM (qk_norm True) of this shape."""
    model_type = "qwen3" if shape.qk_norm else "llama"
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.d_model,
        "intermediate_size": shape.d_ff,
        "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_kv_head,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_seq_len,
        "rms_norm_eps": shape.norm_eps,
        # transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters; each ignores the other's keys
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "initializer_range": 0.02,  # our init's std (Transformer.reset_parameters)
        "use_cache": True,
        "torch_dtype": torch_dtype,  # 4.x name
        "dtype": torch_dtype,  # 5.x name
    }
    if model_type == "llama":
        config |= {"mlp_bias": False, "pretraining_tp": 1}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": shape.n_layer,
                   "layer_types": ["full_attention"] * shape.n_layer}
    return config


def export_hf(ckpt_dir: Path, out_dir: Path, *, dtype: str = "fp32", force: bool = False) -> Path:
    """Write the checkpoint `ckpt_dir` as a transformers model folder `out_dir` (atomically); returns out_dir.

    dtype: "fp32" (logits match lmforge's to ~1e-5) or "bf16" (half the size). A non-empty out_dir is refused
    unless force, and is then replaced as a whole.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    ckpt_dir, out_dir = Path(ckpt_dir).absolute(), Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise LmforgeError(f"{out_dir} exists and is not a folder; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise LmforgeError(f"{out_dir} exists and is not empty; pass --force to replace it, or choose another OUT_DIR")
    if ckpt_dir.resolve().is_relative_to(out_dir.resolve()):
        raise LmforgeError(f"OUT_DIR {out_dir} holds the checkpoint being exported; choose another OUT_DIR")

    loaded = load_model(ckpt_dir, "cpu")
    shape, tokenizer = loaded.model.shape, loaded.tokenizer
    eot, pad, end = (tokenizer.special_ids.get(t) for t in (EOT, PAD, END_OF_TURN))
    tensors = {hf_name(name): t.to(DTYPES[dtype]).contiguous()
               for name, t in loaded.model.state_dict().items()
               if not (shape.tie_embeddings and name == "lm_head.weight")}  # tied: HF re-ties it on load
    specials = {"bos_token": EOT, "eos_token": EOT}
    if pad is not None:
        specials["pad_token"] = PAD
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t in tokenizer.special_ids and t not in (EOT, PAD)],
        "model_max_length": shape.max_seq_len,
        "clean_up_tokenization_spaces": False,  # byte-level BPE decodes exactly; no " ," -> "," rewriting
        "chat_template": loaded.chat_template,
    }
    generation_config = {"bos_token_id": eot, "eos_token_id": [eot, end] if end is not None else eot,
                         "pad_token_id": pad}
    files = {
        "config.json": _json(hf_config(shape, dtype, eot, eot, pad)),
        "generation_config.json": _json(generation_config),
        "model.safetensors": save_safetensors(tensors, metadata={"format": "pt"}),  # transformers wants "format"
        "tokenizer.json": tokenizer.path.read_bytes(),
        "tokenizer_config.json": _json(tokenizer_config),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        replace_dir(tmp, out_dir)  # fsyncs every file, then one rename (or an atomic swap with the old folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmforgeError(f"could not write {out_dir}: {e.strerror or e}; check the path and free disk "
                           f"space") from None
    return out_dir


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# -- import --------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}; pass a folder written by save_pretrained") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON; re-save the model with save_pretrained") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-save the model with save_pretrained")
    return value


def shape_from_hf_config(config: dict[str, Any], *, max_seq_len: int | None = None,
                         where: str = "config.json") -> TransformerShape:
    """The TransformerShape of an HF Llama/Qwen3 config.json; CheckpointError naming any feature we lack.

    max_seq_len: use a shorter context than max_position_embeddings (smaller KV caches when serving).
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; lmforge imports "
                              f"{' and '.join(ARCHITECTURES)} (Llama- and Qwen3-architecture) checkpoints")
    # transformers 5.x keeps rope settings in rope_parameters, 4.x in rope_theta + rope_scaling
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial_rotary = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    unsupported = [
        (config.get("attention_bias", False), "attention biases (attention_bias: true)"),
        (config.get("mlp_bias", False), "MLP biases (mlp_bias: true)"),
        (config.get("hidden_act", "silu") != "silu", f"activation {config.get('hidden_act')!r} (hidden_act; "
                                                      "lmforge's MLP is SwiGLU with silu)"),
        (rope_type != "default", f"rope scaling {rope_type!r} (rope_scaling / rope_parameters)"),
        (partial_rotary != 1.0, f"partial rotary embeddings (partial_rotary_factor {partial_rotary})"),
        (config.get("use_sliding_window", False), "sliding-window attention (use_sliding_window: true)"),
        (any(t != "full_attention" for t in config.get("layer_types") or []),
         f"layer types {sorted(set(config.get('layer_types') or []))} (only full_attention)"),
        ("quantization_config" in config, "quantized weights (quantization_config); import the unquantized model"),
    ]
    for bad, feature in unsupported:
        if bad:
            raise CheckpointError(f"{where}: {feature} is not supported by lmforge's model; import a model without it")
    try:
        n_head = config["num_attention_heads"]
        context = config["max_position_embeddings"]
        if max_seq_len is not None and not 1 <= max_seq_len <= context:
            raise ConfigError(f"--max-seq-len {max_seq_len} must be in 1..{context} (the model's "
                                  f"max_position_embeddings)")
        return TransformerShape(
            vocab_size=config["vocab_size"],
            n_layer=config["num_hidden_layers"],
            d_model=config["hidden_size"],
            n_head=n_head,
            n_kv_head=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            d_ff=config["intermediate_size"],
            max_seq_len=max_seq_len or context,
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e.args[0]}; re-save the model with save_pretrained") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where} describes a shape lmforge cannot build: {e}") from None


def check_hf_tokenizer(raw: bytes, vocab_size: int, where: str = "tokenizer.json") -> int:
    """The number of tokens of `raw`, a tokenizer.json; CheckpointError unless lmforge's Tokenizer runs it as is:
    byte-level BPE (every vocabulary entry spelled in GPT-2's byte alphabet), an <|endoftext|> token, and no
    more tokens than the model's vocab_size (fewer is fine: Qwen pads its embedding beyond its tokenizer)."""
    try:
        spec = json.loads(raw.decode("utf-8"))
        hf = HFTokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{where} is not a readable tokenizer ({str(e).splitlines()[0]})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{where}: a {model.get('type')} tokenizer is not supported; lmforge runs byte-level "
                              f"BPE tokenizers (GPT-2, Qwen, SmolLM style)")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = {t.get("content") for t in spec.get("added_tokens") or []}
    odd = next((t for t in model.get("vocab") or {} if t not in added and not set(t) <= alphabet), None)
    if odd is not None:
        raise CheckpointError(f"{where}: token {odd!r} is not byte-level (e.g. a SentencePiece-style BPE); lmforge "
                              f"runs byte-level BPE tokenizers only")
    if hf.token_to_id(EOT) is None:
        raise CheckpointError(f"{where} has no {EOT} token, which lmforge uses to start and end every document; "
                              f"tokenizers with separate begin/end tokens (e.g. Llama 3's) are not supported")
    size = hf.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise CheckpointError(f"{where} has {size} tokens but the model's vocab_size is {vocab_size}; the "
                              f"tokenizer does not belong to this model")
    return size


def hf_chat_template(hf_dir: Path) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a
    list of named templates, of which "default" or the first), else None."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_path = hf_dir / "tokenizer_config.json"
    template = _read_json(config_path).get("chat_template") if config_path.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None


def read_hf_weights(hf_dir: Path, shape: TransformerShape) -> dict[str, torch.Tensor]:
    """The model.safetensors weights (one file or an index of shards) renamed to lmforge's names, fp32, checked
    against `shape`; a tied lm_head is the embedding tensor itself."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{hf_dir} has no model.safetensors; re-save the model with "
                              f"save_pretrained(..., safe_serialization=True)")
    with torch.device("meta"):  # the expected names and shapes, without allocating weights
        expected = {k: tuple(v.shape) for k, v in Transformer(shape).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors = load_file(hf_dir / file)
        except Exception as e:  # OSError, or safetensors' own error for a damaged file
            raise CheckpointError(f"cannot read {hf_dir / file}: {str(e).splitlines()[0]}") from None
        for key, tensor in tensors.items():
            if key.endswith("rotary_emb.inv_freq"):  # saved by old transformers versions; derived, not learned
                continue
            name = lmforge_name(key)
            if name is None or name not in expected:
                feature = "biases" if key.endswith(".bias") else "weights lmforge's model has no place for"
                raise CheckpointError(f"{hf_dir}: {feature} ({key}) are not supported; import a Llama/Qwen3 model "
                                      f"without them")
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(f"{hf_dir}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                                      f"{expected[name]}; the weights do not match the config")
            state[name] = tensor.float()
    if shape.tie_embeddings:  # save_pretrained stores a tied head once, as the embedding
        state.pop("lm_head.weight", None)
        if "embed.weight" in state:
            state["lm_head.weight"] = state["embed.weight"]
    missing = [hf_name(k) for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{hf_dir} lacks {len(missing)} weights the config implies, e.g. {missing[0]}; the "
                              f"checkpoint is incomplete or of another architecture")
    return state


def run_config(name: str, shape: TransformerShape, tokenizer_vocab: int) -> RunConfig:
    """The config saved with an imported run. The checkpoint's shape (checkpoint.json) is what the model is; the
    model section repeats it as far as the depth dial can say it (width = depth x aspect_ratio, which HF shapes
    such as 1024 wide x 28 layers cannot: there aspect_ratio is head_dim)."""
    exact = shape.d_model % shape.n_layer == 0 and shape.d_model % shape.head_dim == 0
    model = ModelConfig(depth=shape.n_layer, seq_len=shape.max_seq_len,
                        aspect_ratio=shape.d_model // shape.n_layer if exact else shape.head_dim,
                        head_dim=shape.head_dim, kv_group=shape.n_head // shape.n_kv_head, qk_norm=shape.qk_norm,
                        tie_embeddings=shape.tie_embeddings, rope_theta=shape.rope_theta)
    return RunConfig(name=name, model=model, tokenizer=TokenizerConfig(vocab_size=tokenizer_vocab)).validate()


def import_hf(hf_dir: Path, run_dir: Path, *, max_seq_len: int | None = None) -> Path:
    """Import a local HF Llama/Qwen3 model folder as the lmforge run `run_dir` (named by its folder name), with one
    checkpoint at step 0; returns the checkpoint folder. The run folder appears whole or not at all."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"no model folder at {hf_dir}; pass a folder written by save_pretrained")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise LmforgeError(f"run '{run_dir.name}' already exists in {run_dir}; choose another --name")
    config = _read_json(hf_dir / "config.json")
    shape = shape_from_hf_config(config, max_seq_len=max_seq_len, where=str(hf_dir / "config.json"))
    tokenizer_path = hf_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{hf_dir} has no tokenizer.json (a fast tokenizer); save one with "
                              f"AutoTokenizer.from_pretrained(...).save_pretrained(...)")
    tokenizer_json = tokenizer_path.read_bytes()
    tokenizer_size = check_hf_tokenizer(tokenizer_json, shape.vocab_size, str(tokenizer_path))
    template = hf_chat_template(hf_dir) or DEFAULT_CHAT_TEMPLATE
    state = read_hf_weights(hf_dir, shape)

    cfg = run_config(run_dir.name, shape, tokenizer_size)
    meta = {"shape": dataclasses.asdict(shape), "tokenizer_hash": hashlib.sha256(tokenizer_json).hexdigest(),
            "params": count_params(shape)["total"],
            "imported_from": {"format": "hf", "path": str(hf_dir.absolute()), "model_type": config["model_type"]}}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir.parent / f".tmp-import-{run_dir.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / CONFIG).write_bytes(cfg.to_yaml().encode())
        ckpt = save_checkpoint(tmp / "checkpoints", 0, state, {}, cfg.to_yaml(), tokenizer_json, meta, keep_last=1)
        set_chat_template(ckpt, template)
        Tokenizer.load(ckpt)  # the tokenizer runs as lmforge's (raises DataError otherwise)
        replace_dir(tmp, run_dir)
    except OSError as e:
        raise LmforgeError(f"could not write run {run_dir}: {e.strerror or e}; free disk space and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run_dir / "checkpoints" / step_dir_name(0)


def set_chat_template(ckpt_dir: Path, template: str) -> None:
    """Replace a checkpoint's chat template and its entry in checkpoint.json (save_checkpoint always writes the
    default). Only for a checkpoint not yet visible to others: the two writes are not one atomic step."""
    if template == DEFAULT_CHAT_TEMPLATE:
        return
    data = template.encode("utf-8")
    meta = read_meta(ckpt_dir)
    meta["files"][CHAT_TEMPLATE_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for name, content in ((CHAT_TEMPLATE_FILE, data), (META, json.dumps(meta, indent=2).encode())):
        with open(ckpt_dir / name, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    fsync_path(ckpt_dir)
