"""Chat fine-tuning: the loss mask covers exactly the assistant tokens, full and LoRA fine-tuning lower the
assistant-token validation loss, the served model answers in the learned pattern and stops at the end of its turn,
LoRA merges into an ordinary checkpoint, and bad chat data is a one-line error.

The base is the session's tiny pretrained run (conftest.trained_run: one block, 64 wide, context 64, trained on
Python-like code); the chat set is synthetic: the user names two words, the assistant answers with a def line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import expect_one_line_error
from lmforge.checkpoint import load_model, resolve_checkpoint
from lmforge.cli import main
from lmforge.data.chat import CHAT_TEMPLATE_FILE
from lmforge.data.chat_data import IGNORE_INDEX, assistant_mask, collate, encode_conversations
from lmforge.errors import DataError
from lmforge.meter.ledger import Ledger
from lmforge.model.transformer import Transformer, TransformerShape
from lmforge.serve.engine import Engine, EngineConfig, SamplingParams
from lmforge.train.finetune import FinetuneConfig, finetune
from lmforge.train.lora import apply_lora, merge_lora, merged_state_dict
from lmforge.workspace import Workspace

NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha?"},
                {"role": "assistant", "content": "def alpha(beta):"}, {"role": "user", "content": "and beta?"},
                {"role": "assistant", "content": "return beta"}]
# a Qwen-style template (a newline after each role tag) written with our chat tokens
NEWLINE_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
STEPS = 30  # measured: val loss 3.17 -> 0.46 (full, lr 2e-3), the copied names right
LORA_STEPS = 20  # measured: val loss 3.17 -> 1.09 (LoRA r8, lr 1e-2); the def format learnt, not yet the names


def chat_line(a: str, b: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{a} and {b}"},
                         {"role": "assistant", "content": f"def {a}_{b}({a}, {b}):"}]}


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(chat_line(*rng.sample(NAMES, 2))) + "\n" for _ in range(64)))
    return path


@pytest.fixture(scope="module")
def base(trained_run):
    workspace, run, _ = trained_run
    return workspace, load_model(resolve_checkpoint(run, workspace / "runs"))


def chat(ckpt: Path, messages: list[dict[str, str]]):
    engine = Engine(load_model(ckpt), EngineConfig(device="cpu", max_concurrency=1)).start()
    try:
        params = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=engine.chat_stop_token_ids)
        return engine.generate(engine.prepare(messages=messages), params, timeout=60)
    finally:
        engine.stop()


@pytest.mark.parametrize("template", ["default", "newline"])
def test_mask_covers_exactly_the_assistant_tokens(base, template):
    _, loaded = base
    tok = loaded.tokenizer
    template = loaded.chat_template if template == "default" else NEWLINE_TEMPLATE
    ids, mask = assistant_mask(template, CONVERSATION, tok)
    end = tok.special_ids["<|end|>"]
    spans, current = [], []
    for i, counted in zip(ids, mask):
        if counted:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    # each assistant reply: its content's tokens and its <|end|>, nothing of the template around it
    assert spans == [tok.encode("def alpha(beta):") + [end], tok.encode("return beta") + [end]]
    unmasked = tok.decode([i for i, counted in zip(ids, mask) if not counted])
    assert "Be brief." in unmasked and "and beta?" in unmasked and "return beta" not in unmasked
    # the targets: the next id where it is an assistant token, else ignored
    example = encode_conversations([(1, CONVERSATION)], template, tok, context=64)[0][0]
    x, y = collate([example], pad_id=1)
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [n if m else IGNORE_INDEX for n, m in zip(ids[1:], mask[1:])]


def test_long_conversations_truncated_or_dropped_and_batches_padded(base):
    _, loaded = base
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "alpha beta " * 40}]
    long_prompt = [{"role": "user", "content": "gamma delta " * 40}, {"role": "assistant", "content": "ok"}]
    short = CONVERSATION[1:3]
    examples, dropped = encode_conversations([(1, long_reply), (2, long_prompt), (3, short)],
                                             loaded.chat_template, loaded.tokenizer, context=64)
    assert dropped == 1  # the reply of line 2 starts beyond the context
    assert (examples[0].line, examples[0].truncated, len(examples[0].ids)) == (1, True, 65)
    assert not examples[1].truncated
    x, y = collate(examples, pad_id=1)
    assert x.shape == y.shape == (2, 64)
    assert (x[1, len(examples[1].ids) - 1:] == 1).all() and (y[1, len(examples[1].ids) - 1:] == IGNORE_INDEX).all()


def test_a_template_that_rewrites_earlier_turns_is_refused(base):
    _, loaded = base
    # renders the end marker only after the last message: a turn's tokens change once another follows
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if loop.last %}<|end|>{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(DataError, match="renders assistant message 2 differently"):
        assistant_mask(template, CONVERSATION, loaded.tokenizer)


def test_lora_starts_as_the_base_and_merges_exactly():
    shape = TransformerShape(vocab_size=300, n_layer=2, d_model=32, n_head=2, n_kv_head=1, head_dim=16, d_ff=64,
                             max_seq_len=16, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(shape).eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = model(idx)
        wrapped = apply_lora(model, rank=4, alpha=8.0)
        assert len(wrapped) == 2 * 7 and all(not p.requires_grad for n, p in model.named_parameters()
                                             if "lora_" not in n)
        assert torch.equal(model(idx), before)  # B starts at zero
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.05)
        adapted = model(idx)
        plain = Transformer(shape).eval()
        plain.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(plain(idx), adapted, atol=1e-5, rtol=1e-5)
        merge_lora(model)
        assert not any("lora_" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(idx), adapted, atol=1e-5, rtol=1e-5)


def test_full_finetune_cli_learns_the_pattern_and_serves_it(base, chat_file, capsys):
    workspace, loaded = base
    code = main(["--workspace", str(workspace), "finetune", "--ckpt", "tiny", "--data", str(chat_file),
                 "--name", "chat-full", "--max-steps", str(STEPS), "--lr", "2e-3", "--warmup-steps", "5",
                 "--threads", "2", "--eval-every", "15"])
    out, err = capsys.readouterr()
    assert code == 0, err
    run = Ledger(workspace / "ledger.db").get_run("chat-full")
    s = run["summary"]
    assert run["kind"] == "finetune" and run["status"] == "completed"
    assert s["val_loss_after"] < 0.5 * s["val_loss_before"], s
    assert s["steps"] == STEPS and s["tokens"] > s["target_tokens"] > 0 and s["flops"] > 0 and s["energy_j"] > 0
    assert s["val_conversations"] == 6 and s["train_conversations"] == 58 and s["truncated"] == 0
    assert "fine-tuning summary" in out and "->" in out
    ckpt = Path(s["checkpoint"])
    assert ckpt.parent.parent == workspace / "runs" / "chat-full"
    assert (ckpt / CHAT_TEMPLATE_FILE).read_text() == loaded.chat_template
    assert (ckpt / "tokenizer.json").read_bytes() == loaded.tokenizer.path.read_bytes()
    val_steps = [step for step, name, _ in Ledger(workspace / "ledger.db").get_metrics(run["id"], "val_loss")]
    assert val_steps == [0, 15, STEPS]
    # the engine, as `lmforge serve --ckpt chat-full` runs it: the learned answer, then the end of the turn
    result = chat(resolve_checkpoint("chat-full", workspace / "runs"),
                  [{"role": "user", "content": "kappa and beta"}])
    assert result.texts[0] == "def kappa_beta(kappa, beta):"
    assert result.finish_reasons == ["stop"]


def test_lora_finetune_merges_into_an_ordinary_checkpoint(base, chat_file):
    workspace, loaded = base
    result = finetune(FinetuneConfig(ckpt="tiny", data=str(chat_file), name="chat-lora", lora=8,
                                     max_steps=LORA_STEPS, lr=1e-2, warmup_steps=5, threads=2, save_adapter=True),
                      Workspace(workspace))
    s = result.summary
    assert s["method"] == "lora" and s["lora_alpha"] == 16.0
    assert s["val_loss_after"] < 0.5 * s["val_loss_before"], s
    assert s["trainable_params"] < s["params"] / 5
    tuned = load_model(result.checkpoint)  # an ordinary checkpoint: the base's names and shapes
    base_state, tuned_state = loaded.model.state_dict(), tuned.model.state_dict()
    assert base_state.keys() == tuned_state.keys()
    assert torch.equal(base_state["embed.weight"], tuned_state["embed.weight"])  # frozen
    assert torch.equal(base_state["norm.weight"], tuned_state["norm.weight"])
    # merged = base + alpha / rank * B @ A, from the adapter saved alone
    adapter = load_file(result.run_dir / "adapter" / "adapter.safetensors")
    info = json.loads((result.run_dir / "adapter" / "adapter.json").read_text())
    a, b = adapter["blocks.0.attn.q_proj.lora_a"], adapter["blocks.0.attn.q_proj.lora_b"]
    expected = base_state["blocks.0.attn.q_proj.weight"] + info["alpha"] / info["rank"] * b @ a
    torch.testing.assert_close(tuned_state["blocks.0.attn.q_proj.weight"], expected)
    answer = chat(result.checkpoint, [{"role": "user", "content": "gamma and omega"}])
    assert answer.texts[0].startswith("def ") and answer.finish_reasons == ["stop"]


@pytest.mark.parametrize("content,pattern", [
    ("", "holds no conversations"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": [',
     r"chat\.jsonl:2 is not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hello"}]}\n', r"chat\.jsonl:1 has no assistant message"),
    ('{"prompt": "x"}\n', r"chat\.jsonl:1 has no non-empty \"messages\" list"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}\n',
     r"chat\.jsonl:1: message 0 needs a string"),
    ('{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     r"chat\.jsonl:1: the chat template refuses these messages: unknown role tool"),
])
def test_bad_chat_data_is_a_one_line_error(base, tmp_path, capsys, content, pattern):
    workspace, _ = base
    data = tmp_path / "chat.jsonl"
    data.write_text(content)
    code = main(["--workspace", str(workspace), "finetune", "--ckpt", "tiny", "--data", str(data),
                 "--name", "never", "--max-steps", "1"])
    expect_one_line_error(code, capsys.readouterr().err, pattern)
    assert not (workspace / "runs" / "never").exists()


def test_bad_flags_are_one_line_errors(base, chat_file, capsys):
    workspace, _ = base
    for args, pattern in ((["--data", str(chat_file)], "--ckpt"),
                          (["--ckpt", "nope", "--data", str(chat_file)], "no checkpoint, run folder or run named"),
                          (["--ckpt", "tiny", "--data", str(chat_file), "--lora-alpha", "4"], "need --lora RANK"),
                          (["--ckpt", "tiny", "--data", str(chat_file), "--name", "tiny"], "already exists")):
        code = main(["--workspace", str(workspace), "finetune", *args])
        expect_one_line_error(code, capsys.readouterr().err, pattern)
