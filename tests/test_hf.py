"""Hugging Face interop: export -> transformers gives lmforge's logits; a transformers model -> import generates what
transformers generates; the tokenizer and chat template survive both ways; unsupported features are refused.

Everything is built here from random weights and a tokenizer trained on a few lines; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from conftest import expect_one_line_error
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.config import RunConfig
from lmforge.data.chat import render_chat
from lmforge.data.tokenizer import Tokenizer, train_tokenizer
from lmforge.meter.ledger import Ledger
from lmforge.model.sampling import generate
from lmforge.model.transformer import Transformer, TransformerShape
from lmforge.serve.engine import Engine, EngineConfig, SamplingParams

# Measured on CPU, torch 2.13 / transformers 5.24: 0.0 (the same fp32 ops in the same order). The bound leaves
# room for other kernels or versions. Mistakes measured on this model are 1e-2 and more: q_norm/k_norm swapped in
# one layer 0.027, gate/up swapped 0.013, the two layer norms swapped 0.12, q/k rows permuted for interleaved RoPE 0.22.
LOGITS_ATOL = 1e-5
TEXTS = ["def alpha(beta, gamma):\n    total = beta + gamma\n    return total * 2\n",
         "The quick brown fox jumps over the lazy dog. Ünïcödé, 日本語, emoji 🙂!\n"]
SAMPLES = ["def alpha(beta):\n    return beta - 1", "  leading spaces\tand tabs\n\n", "日本語 🙂 ü", "x"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def alpha(beta)?"},
            {"role": "assistant", "content": "It returns beta."}, {"role": "user", "content": "Thanks!"}]
# a Qwen-style template written with our chat tokens, to check that import keeps the model's own template
CUSTOM_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(TEXTS * 20, 320, tmp_path_factory.mktemp("tok"), min_frequency=1)


def lmforge_checkpoint(root: Path, tokenizer: Tokenizer, *, qk_norm: bool, tied: bool) -> Path:
    """A random-weight lmforge checkpoint with a small GQA shape (4 query heads sharing 2 key/value heads)."""
    shape = TransformerShape(vocab_size=tokenizer.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                             head_dim=16, d_ff=96, max_seq_len=64, qk_norm=qk_norm, tie_embeddings=tied,
                             rope_theta=5000.0)
    torch.manual_seed(0)
    model = Transformer(shape)
    with torch.no_grad():  # norm gains away from 1, so a gain applied to the wrong tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return save_checkpoint(root / "checkpoints", 1, model.state_dict(), {}, RunConfig().to_yaml(),
                           tokenizer.path.read_bytes(), {"shape": dataclasses.asdict(shape)}, keep_last=1)


@pytest.mark.parametrize("qk_norm,tied", [(True, False), (True, True), (False, False), (False, True)])
def test_export_logits_match_transformers(tmp_path, cli, tokenizer, qk_norm, tied):
    ckpt = lmforge_checkpoint(tmp_path / "run", tokenizer, qk_norm=qk_norm, tied=tied)
    code, out, err = cli("export", "hf", str(ckpt), str(tmp_path / "hf"))
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    assert hf.config.tie_word_embeddings == tied
    ours = load_model(ckpt).model
    ids = torch.tensor([[tokenizer.eot_id] + tokenizer.encode(TEXTS[0] + TEXTS[1])[:60]])  # (1, T)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= LOGITS_ATOL, f"max |logit difference| {diff}"


def test_export_tokenizer_chat_template_and_reimport(tmp_path, cli, tokenizer):
    ckpt = lmforge_checkpoint(tmp_path / "run", tokenizer, qk_norm=True, tied=False)
    out_dir = tmp_path / "hf"
    assert cli("export", "hf", str(ckpt), str(out_dir), "--dtype", "bf16")[0] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    for text in SAMPLES:
        assert hf_tok.encode(text) == tokenizer.encode(text)
        assert hf_tok.decode(tokenizer.encode(text)) == text
    loaded = load_model(ckpt)
    ours = render_chat(loaded.chat_template, MESSAGES, tokenizer)
    assert list(hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)) == ours
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eot_id, tokenizer.special_ids["<|end|>"]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.model.embed_tokens.weight, loaded.model.embed.weight.bfloat16())

    # and back: the exported folder imports as the same model (bf16-rounded), tokenizer and template
    code, out, err = cli("import", "hf", str(out_dir), "--name", "back", "--max-seq-len", "32")
    assert code == 0, err
    back = load_model(Path(out.strip()))
    assert back.model.shape == dataclasses.replace(loaded.model.shape, max_seq_len=32)
    for (name, a), b in zip(loaded.model.state_dict().items(), back.model.state_dict().values(), strict=True):
        assert torch.equal(a.bfloat16().float(), b), name
    assert back.tokenizer.hash == tokenizer.hash and back.chat_template == loaded.chat_template


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path, cli, tokenizer):
    ckpt = lmforge_checkpoint(tmp_path / "run", tokenizer, qk_norm=False, tied=True)
    out_dir = tmp_path / "hf"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    expect_one_line_error(*cli("export", "hf", str(ckpt), str(out_dir))[::2], r"not empty; pass --force")
    assert (out_dir / "keep.txt").exists()
    assert cli("export", "hf", str(ckpt), str(out_dir), "--force")[0] == 0
    assert not (out_dir / "keep.txt").exists() and (out_dir / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    expect_one_line_error(*cli("export", "hf", str(ckpt), str(tmp_path / "run"), "--force")[::2],
                          r"holds the checkpoint being exported")


def hf_model_dir(root: Path, tokenizer: Tokenizer, model_type: str, *, tied: bool, extra_vocab: int = 0) -> Path:
    """save_pretrained of a random transformers Llama/Qwen3 model and a fast tokenizer made from ours."""
    config_class = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[model_type]
    config = config_class(vocab_size=tokenizer.vocab_size + extra_vocab, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                          initializer_range=0.2,  # decisive logits: greedy picks never hinge on rounding
                          bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.path), eos_token="<|endoftext|>",
                                                  bos_token="<|endoftext|>")
    hf_tok.chat_template = CUSTOM_TEMPLATE
    hf_tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def hf_template_dir(tmp_path_factory, tokenizer) -> Path:
    """One saved Qwen3 model folder, copied and damaged by the tests of refusals."""
    return hf_model_dir(tmp_path_factory.mktemp("hf") / "model", tokenizer, "qwen3", tied=False)


@pytest.mark.parametrize("model_type,tied,extra_vocab", [("llama", True, 0), ("qwen3", False, 13)])
def test_import_generates_like_transformers(tmp_path, cli, tokenizer, model_type, tied, extra_vocab):
    """extra_vocab: embedding rows beyond the tokenizer's ids, as Qwen3 pads 151,669 tokens to 151,936."""
    hf_dir = hf_model_dir(tmp_path / "hf", tokenizer, model_type, tied=tied, extra_vocab=extra_vocab)
    code, ckpt, err = cli("import", "hf", str(hf_dir), "--name", "imported")
    assert code == 0, err
    loaded = load_model(Path(ckpt.strip()))
    assert loaded.model.shape.qk_norm == (model_type == "qwen3") and loaded.chat_template == CUSTOM_TEMPLATE
    assert loaded.model.shape.vocab_size == tokenizer.vocab_size + extra_vocab  # padded rows kept: exact logits
    assert all(loaded.tokenizer.encode(t) == tokenizer.encode(t) for t in SAMPLES)  # save_pretrained reformats it

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt = [tokenizer.eot_id] + tokenizer.encode("def alpha(beta):")
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                               min_new_tokens=24)[0, len(prompt):].tolist()
    assert list(generate(loaded.model, prompt, max_new_tokens=24, temperature=0)) == expected
    if extra_vocab:  # a random model picks padding ids, which have no text (trained ones never do)
        return

    # the CLI's generate (stops at <|endoftext|>) prints the same continuation; the run is in the ledger
    until_eot = expected[:expected.index(tokenizer.eot_id)] if tokenizer.eot_id in expected else expected
    code, out, err = cli("generate", "--ckpt", "imported", "--temperature", "0", "--max-new-tokens", "24",
                         "--device", "cpu", "def alpha(beta):")
    assert code == 0, err
    assert out == "def alpha(beta):" + tokenizer.decode(until_eot) + "\n"
    engine = Engine.from_checkpoint(Path(ckpt.strip()), EngineConfig(max_concurrency=2)).start()  # and it serves
    try:
        served = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0), timeout=30)
    finally:
        engine.stop()
    assert served.token_ids[0] == until_eot
    run = Ledger(cli.workspace / "ledger.db").get_run("imported")
    assert run["kind"] == "import" and run["status"] == "completed"
    expect_one_line_error(*cli("import", "hf", str(hf_dir), "--name", "imported")[::2], r"already .*--name")


def _set(key, value):
    return lambda d: d.update({key: value})


@pytest.mark.parametrize("mutate,pattern", [
    (_set("attention_bias", True), r"attention biases \(attention_bias: true\)"),
    (_set("mlp_bias", True), r"MLP biases"),
    (_set("hidden_act", "gelu"), r"activation 'gelu'"),
    (_set("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), r"rope scaling 'llama3'"),
    (lambda d: d.update(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}),
     r"rope scaling 'linear'"),
    (_set("use_sliding_window", True), r"sliding-window attention"),
    (_set("model_type", "qwen2"), r"model_type 'qwen2' is not supported"),
    (lambda d: d.pop("hidden_size"), r"lacks hidden_size"),
])
def test_import_refuses_unsupported_config(tmp_path, cli, tokenizer, hf_template_dir, mutate, pattern):
    hf_dir = shutil.copytree(hf_template_dir, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    mutate(config)
    (hf_dir / "config.json").write_text(json.dumps(config))
    expect_one_line_error(*cli("import", "hf", str(hf_dir))[::2], pattern, only_line=True)
    assert not (cli.workspace / "runs" / "hf").exists()


def test_import_refuses_unsupported_weights_and_tokenizers(tmp_path, cli, tokenizer, hf_template_dir):
    hf_dir = shutil.copytree(hf_template_dir, tmp_path / "hf")
    weights = load_file(hf_dir / "model.safetensors")
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, hf_dir / "model.safetensors",
              metadata={"format": "pt"})
    expect_one_line_error(*cli("import", "hf", str(hf_dir))[::2], r"biases \(model.layers.0.self_attn.q_proj.bias\)")
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})

    spec = json.loads(tokenizer.path.read_text())  # the boundary token renamed, as in Llama 3's tokenizer
    spec["added_tokens"][0]["content"] = "<|end_of_text|>"
    spec["model"]["vocab"]["<|end_of_text|>"] = spec["model"]["vocab"].pop("<|endoftext|>")
    (hf_dir / "tokenizer.json").write_text(json.dumps(spec))
    expect_one_line_error(*cli("import", "hf", str(hf_dir))[::2], r"no <\|endoftext\|> token")
    spec = json.loads(tokenizer.path.read_text())  # a SentencePiece-style token: not GPT-2's byte alphabet
    spec["model"]["vocab"]["\u2581hello"] = len(spec["model"]["vocab"])
    (hf_dir / "tokenizer.json").write_text(json.dumps(spec))
    expect_one_line_error(*cli("import", "hf", str(hf_dir))[::2], r"token '▁hello' is not byte-level")
    (hf_dir / "tokenizer.json").unlink()
    expect_one_line_error(*cli("import", "hf", str(hf_dir))[::2], r"no tokenizer.json")
    expect_one_line_error(*cli("import", "hf", str(hf_template_dir), "--max-seq-len", "100")[::2],
                          r"--max-seq-len 100 must be in 1..64")
    assert not (cli.workspace / "runs").exists() or not any((cli.workspace / "runs").iterdir())
