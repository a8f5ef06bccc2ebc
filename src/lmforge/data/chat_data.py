"""Chat fine-tuning data: OpenAI-style `messages` JSONL → token ids with a mask of the assistant tokens.

Each line of the file is {"messages": [{"role": ..., "content": ...}, ...]}. A conversation is rendered with the
checkpoint's chat template by `render_chat`, the very function the server renders prompts with, so the model is
trained on exactly the token sequences it will be served.

Finding the assistant tokens (what the loss counts) by incremental rendering, for each assistant message i:

    1. prompt_i = render(messages[:i], add_generation_prompt=True)   what the server feeds before the reply
    2. turn_i   = render(messages[:i + 1])                             the same with the reply and its end
    3. the assistant tokens are turn_i[len(prompt_i):], cut after their last end-of-turn token (<|end|>) when
       the tokenizer has one (the newline a template writes between turns is never generated, so not trained)

Both renders must be prefixes of the whole conversation's render, and prompt_i of turn_i; a template that renders
earlier turns differently once later turns follow (e.g. one that drops past reasoning) is refused, because the
tokens it trains on would not be the tokens it serves. Rendering is per message (placeholders, data/chat.py), so
the token boundaries of a prefix never shift when more text follows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

from lmforge.data.chat import END_OF_TURN, render_chat
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError

IGNORE_INDEX = -100  # the target value the model's loss skips (model/transformer.py, model/loss.py)
FORMAT_HINT = 'each line must be {"messages": [{"role": "user", "content": "..."}, ...]}'


@dataclass
class ChatExample:
    """One conversation as training data: ids (L,) and, per id, whether the loss counts it (an assistant token)."""
    ids: list[int]
    assistant: list[bool]
    line: int  # 1-based line of the JSONL file
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        """Tokens the loss counts: assistant tokens at positions 1.. (position 0 has nothing before it)."""
        return sum(self.assistant[1:])


def read_chat_jsonl(path: Path) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) for every non-blank line; DataError naming the first bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"no chat data at {path}; pass --data FILE.jsonl ({FORMAT_HINT})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}; pass a JSONL file ({FORMAT_HINT})") from None
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); {FORMAT_HINT}") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where} has no non-empty \"messages\" list; {FORMAT_HINT}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} needs a string \"role\" and a string \"content\", got "
                                f"{json.dumps(m)[:80]}; {FORMAT_HINT}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where} has no assistant message, so nothing to learn from it; add the assistant's "
                            f"reply or remove the line")
        conversations.append((number, [{"role": m["role"], "content": m["content"]} for m in messages]))
    if not conversations:
        raise DataError(f"{path} holds no conversations; {FORMAT_HINT}")
    return conversations


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[:len(prefix)] == prefix


def assistant_mask(template: str, messages: list[dict[str, str]], tokenizer: Tokenizer,
                   where: str = "conversation") -> tuple[list[int], list[bool]]:
    """The conversation's token ids under `template` and, per id, whether it belongs to an assistant reply (its
    content and end-of-turn token). DataError when the template refuses the messages or is not incremental."""
    try:
        ids = render_chat(template, messages, tokenizer, add_generation_prompt=False)
        mask = [False] * len(ids)
        end_of_turn = tokenizer.special_ids.get(END_OF_TURN)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render_chat(template, messages[:i], tokenizer, add_generation_prompt=True)
            turn = render_chat(template, messages[:i + 1], tokenizer, add_generation_prompt=False)
            if not (_is_prefix(prompt, turn) and _is_prefix(turn, ids)):
                raise DataError(f"{where}: the chat template renders assistant message {i} differently once later "
                                f"messages follow, so its tokens cannot be located; use a template that renders "
                                f"each turn the same way whatever follows")
            end = len(turn)
            if end_of_turn is not None and end_of_turn in turn[len(prompt):]:
                end = len(turn) - turn[::-1].index(end_of_turn)  # just after the reply's last <|end|>
            mask[len(prompt):end] = [True] * (end - len(prompt))
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: the chat template refuses these messages: {e}") from None
    return ids, mask


def encode_conversations(conversations: list[tuple[int, list[dict[str, str]]]], template: str, tokenizer: Tokenizer,
                         context: int, path: Path | str = "data") -> tuple[list[ChatExample], int]:
    """Rendered, masked examples of at most context + 1 ids (context inputs and their next-token targets).

    Longer conversations are truncated to their first context + 1 ids (ChatExample.truncated); one with no
    assistant token left after that is dropped. Returns (examples, how many were dropped).
    """
    examples, dropped = [], 0
    for line, messages in conversations:
        ids, mask = assistant_mask(template, messages, tokenizer, where=f"{path}:{line}")
        truncated = len(ids) > context + 1
        example = ChatExample(ids[:context + 1], mask[:context + 1], line, truncated)
        if example.n_targets == 0:
            dropped += 1
            continue
        examples.append(example)
    return examples, dropped


def collate(examples: list[ChatExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (B, T) and targets y (B, T) for a batch, T = the longest example's length - 1.

    y[b, t] is the id after x[b, t] where that id is an assistant token, else IGNORE_INDEX; rows are padded at
    the end with pad_id, whose targets are IGNORE_INDEX too (and, the attention being causal, padding after a
    row's tokens changes nothing before it).
    """
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        counted = torch.tensor(e.assistant[1:], dtype=torch.bool)
        x[b, :len(ids) - 1] = ids[:-1]
        y[b, :len(ids) - 1] = ids[1:].masked_fill(~counted, IGNORE_INDEX)
    return x, y
