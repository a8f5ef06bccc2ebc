"""lm-evaluation-harness over lmforge checkpoints: the `lmforge` model adapter, the shipped tasks, one runner.

The adapter (`LmforgeLM`, registered in lm-eval as "lmforge") answers lm-eval's three request types from a loaded
checkpoint in this process:

    loglikelihood          log P(continuation | context) and whether greedy decoding would produce it; batched,
                           longest first, one forward pass per batch
    loglikelihood_rolling  log P(text) over windows of the model's context, each token predicted once
    generate_until         greedy or sampled decoding (model/sampling.py) until a stop string or max_gen_toks

It subclasses lm-eval's TemplateLM, so a (context, continuation) pair is split into tokens exactly as lm-eval's
own models and its `local-completions` client split it: trailing spaces of the context move to the continuation,
context + continuation is encoded whole, and the continuation is what lies past the encoded context. That is what
makes a score here equal to the score lm-eval computes against `lmforge serve` (docs/evaluation.md).

Tasks written by the project live in tasks/ (YAML + JSONL, no download). `build_task_manager` indexes only them
when every requested task is one of them, which skips the ~8 s lm-eval spends indexing its own ~14,000 task
configs; anything else lm-eval knows is found too, and may need its data set downloaded.

Shape letters: B batch, T time, V vocab.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
from tqdm import tqdm

from lmforge.checkpoint import LoadedModel, load_model, resolve_checkpoint
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.model.sampling import generate
from lmforge.train.runtime import resolve_device
from lmforge.workspace import Workspace

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_BATCH_SIZE = 16  # sequences per forward pass for loglikelihood requests; "auto" means this
# lm-eval's default seed for API models: sampled generations repeat from run to run
DEFAULT_SEED = 1234
# what generate_until understands: lm-eval's names for the token budget, stop strings and sampling settings
GENERATION_KEYS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample",
                   "temperature", "top_k", "top_p"}
BOOTSTRAP_ITERS = 1000  # lm-eval's default of 100,000 resamples takes minutes for the perplexity metrics' stderr


def shipped_tasks() -> list[str]:
    """Names of the tasks shipped in lmforge/evals/tasks (loadable offline)."""
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge checkpoint as an lm-eval model.

    ckpt: a LoadedModel, a checkpoint or run folder, or a run name (looked up in `workspace`, default as the CLI's).
    batch_size: sequences per forward pass for log-likelihoods; memory grows with batch x context x vocabulary.
    In lm-eval terms: `simple_evaluate(model="lmforge", model_args="ckpt=RUN,batch_size=8")` once lmforge.evals
    is imported. Weights run in the precision they were loaded in (fp32 from a checkpoint).
    """

    def __init__(self, ckpt: str | Path | LoadedModel, *, workspace: str | None = None, device: str = "auto",
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_gen_toks: int | None = None,
                 seed: int = DEFAULT_SEED):
        super().__init__()
        if isinstance(ckpt, LoadedModel):
            self.loaded = ckpt
        else:
            path = resolve_checkpoint(str(ckpt), Workspace.resolve(workspace).runs_dir)
            self.loaded = load_model(path, resolve_device(device, "device"))
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.batch_size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        # for tasks that set no budget: lm-eval's usual 256 new tokens, but at most half the context (small
        # lmforge models have contexts of 64-1024 tokens), so a prompt keeps room
        self.max_gen_toks = int(max_gen_toks) if max_gen_toks is not None else min(256, self.max_length // 2)
        self.seed = int(seed)
        if self.batch_size < 1 or self.max_gen_toks < 1:
            raise ConfigError(f"batch_size and max_gen_toks must be at least 1, got {batch_size} and {max_gen_toks}")
        self._device = self.model.embed.weight.device

    # ---- what TemplateLM needs -----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id  # also the prefix of an empty context, as <|endoftext|> starts documents

    @property
    def max_length(self) -> int:
        return self.model.shape.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.hash  # lm-eval keys its request caches by this

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)  # lmforge adds no special tokens to text

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in its results' config."""
        return {"checkpoint": str(self.loaded.path), "step": self.loaded.step,
                "parameters": self.model.num_params(), "context": self.max_length}

    # ---- the three request types ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(cache key, context ids, continuation ids) -> (log-likelihood of the continuation, is it greedy).

        An input longer than the context keeps its last max_length + 1 tokens (the context's oldest go first);
        the last token is only predicted, never fed.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first: each batch is padded to its first row, and an input that does not fit fails at once
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                inputs, continuations = [], []
                for i in batch:
                    _, context, continuation = requests[i]
                    if not context or len(continuation) > self.max_length:
                        raise LmforgeError(f"a loglikelihood request has {len(context)} context and "
                                           f"{len(continuation)} continuation tokens; it needs at least one "
                                           f"context token and at most {self.max_length} continuation tokens")
                    inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
                    continuations.append(continuation)
                scores = self._score(inputs, continuations)
                for i, score in zip(batch, scores):
                    results[i] = score
                    if requests[i][0] is not None:  # rolling windows have no key of their own
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score(self, inputs: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """One forward pass over right-padded inputs; each continuation scored from the positions before it."""
        T = max(len(x) for x in inputs)
        idx = torch.full((len(inputs), T), self.eot_token_id, dtype=torch.long)  # (B, T)
        for row, ids in enumerate(inputs):
            idx[row, : len(ids)] = torch.tensor(ids)
        # padding sits after each row's last real token, so causal attention never lets a real position see it
        # an imported model may have more embedding rows than its tokenizer has tokens: those are no outcome
        # (the server drops them too)
        logits = self.model(idx.to(self._device))[..., : self.tokenizer.vocab_size]  # (B, T, V)
        scores = []
        for row, (ids, continuation) in enumerate(zip(inputs, continuations)):
            if not continuation:
                scores.append((0.0, True))
                continue
            end = len(ids)
            # only the positions that predict the continuation: fp32 log-softmax over (len(continuation), V)
            predicted = F.log_softmax(logits[row, end - len(continuation) : end].float(), dim=-1)
            target = torch.tensor(continuation, device=predicted.device)
            loglikelihood = predicted.gather(-1, target[:, None]).sum()
            scores.append((float(loglikelihood), bool((predicted.argmax(dim=-1) == target).all())))
        return scores

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log P(text) for whole texts: windows of the model's context, each token predicted exactly once."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (loglikelihood, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += loglikelihood
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its stop strings (cut off, as lm-eval expects) or max_gen_toks."""
        eos = self.tok_decode([self.eot_token_id])
        outputs = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            unknown = sorted(set(gen_kwargs) - GENERATION_KEYS)
            if unknown:
                raise ConfigError(f"generation settings {unknown} are not supported by the lmforge adapter; it "
                                  f"takes {sorted(GENERATION_KEYS)}")
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs["until"], eos)
            max_new = kwargs["max_gen_toks"]
            if max_new >= self.max_length:
                raise ConfigError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's context of "
                                  f"{self.max_length} tokens; ask for fewer")
            prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0
            text = self._generate(prompt, until, max_new, temperature, kwargs.get("top_k") or None,
                                  kwargs.get("top_p"))
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs

    def _generate(self, prompt: list[int], until: list[str], max_new: int, temperature: float,
                  top_k: int | None, top_p: float | None) -> str:
        stream, text = self.tokenizer.decode_stream(), ""
        for token in generate(self.model, prompt, max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=self.seed, stop_ids=(self.eot_token_id,)):
            text += stream.push(token)
            if any(stop in text for stop in until):
                break
        text += stream.flush()
        for stop in until:
            text = text.split(stop)[0]
        return text


def build_task_manager(tasks: list[str]) -> TaskManager:
    """A TaskManager that knows `tasks`: the shipped ones alone when that is enough, else lm-eval's too.

    ConfigError naming the task (and the closest known names) when a task is unknown to both.
    """
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(TASKS_DIR))
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"unknown task {task!r}; {hint}lmforge ships {', '.join(shipped_tasks())}, and "
                              f"`lm-eval ls tasks` lists lm-eval's own")
    return manager


def evaluate_tasks(model: LM | str, tasks: list[str], *, model_args: str | None = None, limit: int | None = None,
                   log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval on `tasks` with `model` (an LM, or a registered name plus `model_args`); its results dict.

    `limit` caps the documents per task. DataError, in one line, when a task's data set must be downloaded and
    cannot be (offline, or HF_HUB_OFFLINE=1 without a cached copy).
    """
    if not tasks:
        raise ConfigError("no task given; pass --tasks NAME[,NAME] (lmforge ships " + ", ".join(shipped_tasks()) + ")")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    manager = build_task_manager(tasks)
    try:
        results = simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=limit,
                                  log_samples=log_samples, bootstrap_iters=BOOTSTRAP_ITERS)
    except ConnectionError as e:  # the Hub client's, for a data set or metric it cannot fetch
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"task(s) {', '.join(tasks)} need a download that failed ({first_line}); run once with "
                        f"network access so the Hugging Face cache holds the data, or use a shipped task: "
                        f"{', '.join(shipped_tasks())}") from None
    return results


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: 'acc,none' becomes 'acc' (other filters keep a suffix,
    'exact_match/flexible-extract'); values lm-eval could not compute ('N/A') are left out."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in {**results.get("results", {}), **results.get("groups", {})}.items():
        row = {}
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # 'alias' and other labels
            if math.isfinite(value):
                row[name if filter_name == "none" else f"{name}/{filter_name}"] = float(value)
        scores[task] = row
    return scores


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of the results (and of groups, when there are any)."""
    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")
