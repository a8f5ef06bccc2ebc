"""External detectors: a local Hugging Face model you already trust, plugged into the guard (name "external").

    HFClassifierDetector      a sequence-classification model (e.g. a toxicity or prompt-injection classifier):
                              its labels are mapped to our hazard categories, its softmax/sigmoid scores kept
    LlamaGuardJudgeDetector   a Llama-Guard-3-style generative judge: it is shown our categories with their S-codes
                              and the conversation, answers "safe" or "unsafe\\nS1,S10", and that answer is parsed

Both load a model folder from disk with `transformers` (local files only: nothing is downloaded) and read the first
window of a text (a bounded cost for a 1 MB text): `max_tokens` tokens for the classifier, `max_chars` characters
for the judge. Generation is greedy, so the same text always gets the same verdict.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import ConfigError
from lmforge.guard.core import CATEGORIES, Detection

# Labels that mean "nothing wrong": recognised so they are not reported as hazards (compared lower-cased)
BENIGN_LABELS = {"benign", "safe", "neutral", "ok", "none", "normal", "clean", "non-toxic", "non_toxic",
                 "not_toxic", "nontoxic", "not-toxic", "no_hate", "not_hate", "label_safe"}
CODES = {code: name for name, (code, _) in CATEGORIES.items()}  # "S1" -> "violent_crimes", "PII" -> "pii"
# Llama Guard 3's own wording of its categories, where it is not just our name title-cased
LLAMA_GUARD_NAMES = {"sex_related_crimes": "Sex-Related Crimes", "suicide_self_harm": "Suicide & Self-Harm"}
CHARS_PER_TOKEN_BOUND = 16  # as in guard/semantic.py: cut before tokenizing, never losing a token of the window


def _load_tokenizer_and(model_dir: str | Path, auto_class: str):
    """(tokenizer, model) from a local folder with transformers' Auto classes; ConfigError when that cannot be."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("external guard detectors need the 'transformers' package; pip install transformers") \
            from None
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"no Hugging Face model at {path} (config.json missing); pass model_dir=FOLDER holding "
                          f"config.json, the weights and the tokenizer files")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = getattr(transformers, auto_class).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load {path} as a {auto_class} with its tokenizer: {e}") from None
    return tokenizer, model.eval()


def default_category(label: str) -> str | None:
    """Our category for a model label that already names one ("hate", "S10", "Violent Crimes"); None otherwise."""
    key = label.strip().lower().replace(" ", "_").replace("-", "_")
    if key in CATEGORIES:
        return key
    return CODES.get(label.strip().upper())


class HFClassifierDetector:
    """A local sequence-classification model as a detector.

    Labels come from `model.config.id2label` and map to categories through `category_map` (model label -> our
    category; labels that already name a category or an S-code map to it without one). Labels that are benign-like
    ("safe", "neutral", "non-toxic", ... see BENIGN_LABELS) mean no hazard; any other label that does not map is
    ignored, and listed in `.ignored_labels`. Scores are a softmax over the labels, or a per-label sigmoid when
    the model's config says problem_type "multi_label_classification" or it has a single output. Each mapped label
    scoring at least `threshold` becomes a Detection (span None, detector "external"); labels mapping to the same
    category keep the highest score.
    """

    name = "external"

    def __init__(self, model_dir: str | Path, category_map: dict[str, str] | None = None, threshold: float = 0.5,
                 device: str = "cpu", max_tokens: int = 512):
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"external threshold must be in (0, 1], got {threshold}")
        for label, category in (category_map or {}).items():
            if category not in CATEGORIES:
                raise ConfigError(f"category_map[{label!r}] = {category!r} is not a category; use one of "
                                  f"{', '.join(CATEGORIES)}")
        self.tokenizer, model = _load_tokenizer_and(model_dir, "AutoModelForSequenceClassification")
        self.model = model.to(device)
        self.device = device
        self.threshold = threshold
        config = self.model.config
        self.multi_label = config.problem_type == "multi_label_classification" or config.num_labels == 1
        limit = getattr(config, "max_position_embeddings", None) or max_tokens
        self.max_tokens = min(max_tokens, limit)
        self.label_category: dict[int, str] = {}  # output index -> our category
        self.ignored_labels: list[str] = []
        for index, label in sorted(config.id2label.items()):
            label = str(label)
            category = (category_map or {}).get(label) or default_category(label)
            if category is not None:
                self.label_category[int(index)] = category
            elif label.strip().lower() not in BENIGN_LABELS:
                self.ignored_labels.append(label)
        if not self.label_category:
            labels = [str(v) for _, v in sorted(config.id2label.items())]
            raise ConfigError(f"none of {model_dir}'s labels {labels} maps to a hazard category; pass "
                              f"category_map={{'{labels[-1]}': 'hate'}} (label -> category)")

    @torch.inference_mode()
    def scores(self, text: str) -> dict[str, float]:
        """Each mapped category's score for `text` (the highest of the labels mapping to it)."""
        enc = self.tokenizer(text[: self.max_tokens * CHARS_PER_TOKEN_BOUND], truncation=True,
                             max_length=self.max_tokens, return_tensors="pt").to(self.device)
        logits = self.model(**enc).logits[0].float()  # (L,) one per label
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        out: dict[str, float] = {}
        for index, category in self.label_category.items():
            out[category] = max(out.get(category, 0.0), float(probs[index]))
        return out

    def detect(self, text: str) -> list[Detection]:
        found = [(score, category) for category, score in self.scores(text).items() if score >= self.threshold]
        return [Detection(category, score, None, self.name) for score, category in sorted(found, reverse=True)]


def category_title(name: str) -> str:
    return LLAMA_GUARD_NAMES.get(name, name.replace("_", " ").title())


def build_llama_guard_prompt(conversation: list[tuple[str, str]], categories: dict = CATEGORIES) -> str:
    """The Llama Guard 3 prompt asking about the last turn of `conversation` ((role, text) pairs; role "User" or
    "Agent"), with the hazard categories that have an S-code. No <|begin_of_text|>: the tokenizer adds its BOS."""
    if not conversation:
        raise ConfigError("a Llama Guard prompt needs at least one (role, text) turn")
    role = conversation[-1][0]
    listed = "\n".join(f"{code}: {category_title(name)}." for name, (code, _) in categories.items()
                       if code.startswith("S"))
    turns = "\n\n".join(f"{who}: {text}" for who, text in conversation)
    return (
        "<|start_header_id|>user<|end_header_id|>\n\n"
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy "
        "with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{listed}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{turns}\n\n<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def parse_llama_guard_output(output: str, detector: str = "external") -> list[Detection]:
    """Detections (score 1.0, span None) from a judge's answer: "safe" -> [], "unsafe\\nS1,S10" -> S1 and S10.

    Unknown codes are dropped; an answer that is neither "safe" nor "unsafe" followed by known codes (junk, or
    "unsafe" with no category) gives [] too, since it names no category to act on.
    """
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if len(lines) < 2 or lines[0].lower() != "unsafe":
        return []
    codes = dict.fromkeys(code.strip().upper() for code in lines[1].split(","))  # ordered, deduplicated
    return [Detection(CODES[code], 1.0, None, detector) for code in codes if code in CODES and code != "PII"]


class LlamaGuardJudgeDetector:
    """A Llama-Guard-style judge (a local causal LM) as a detector: it judges each text as the last turn of a
    one-turn conversation by `role` ("User" for prompts, "Agent" for model responses), greedily generates up to
    `max_new_tokens` tokens and parses them (parse_llama_guard_output). Texts are cut to their first `max_chars`
    characters (about 4k tokens, well inside Llama Guard 3's 8k context)."""

    name = "external"

    def __init__(self, model_dir: str | Path, device: str = "cpu", role: str = "User", max_new_tokens: int = 10,
                 max_chars: int = 16_000):
        if role not in ("User", "Agent"):
            raise ConfigError(f"Llama Guard role must be 'User' or 'Agent', got {role!r}")
        self.tokenizer, model = _load_tokenizer_and(model_dir, "AutoModelForCausalLM")
        self.model = model.to(device)
        self.device = device
        self.role = role
        self.max_new_tokens = max_new_tokens
        self.max_chars = max_chars
        # no pad token in Llama tokenizers; generate() only needs one to fill finished rows, and there is one row
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id

    @torch.inference_mode()
    def judge(self, conversation: list[tuple[str, str]]) -> str:
        """The judge's raw answer for the last turn of `conversation`."""
        prompt = build_llama_guard_prompt(conversation)
        enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        out = self.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                  max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.pad_id)  # (1, T + new)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def detect(self, text: str) -> list[Detection]:
        return parse_llama_guard_output(self.judge([(self.role, text[: self.max_chars])]), self.name)
