"""Typed configuration for every part of lmforge.

One documented field serves the code, `--help` and the YAML file: each field carries its doc string in
`metadata["doc"]`, the CLI turns every field into a `--section.field` flag with that text as help, and a YAML
config has one mapping per section with the same names. Values resolve in one order:

    defaults  <  YAML file (--config)  <  command-line flags

`RunConfig.validate()` checks the settings against each other and names the flag that fixes a problem. The
resolved config is saved (as YAML) next to every checkpoint, so a run can be explained and repeated from its folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError


def option(default: Any, doc: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its documentation (and, for enumerations, the allowed values)."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class DataConfig:
    source: str = option(
        "stdlib",
        "Where the text comes from: 'stdlib' (the Python standard library sources on this machine, no download), "
        "a directory of text files, a .jsonl file or a .parquet file (or a directory of either).",
    )
    format: str = option(
        "auto", "How to read --data.source; 'auto' decides from the path.",
        choices=("auto", "stdlib", "text", "jsonl", "parquet"),
    )
    glob: str = option("**/*", "Which files of a text directory to read (binary files are skipped and counted).")
    text_field: str = option("text", "The field (.jsonl) or column (.parquet) that holds the document text.")
    val_fraction: float = option(
        0.01, "Share of documents held out for validation, chosen by a hash of each document (deterministic)."
    )
    name: str = option(
        "", "Name of the corpus in the workspace; empty derives it from the source ('stdlib', or the path's stem)."
    )
    token_dtype: str = option(
        "auto", "Integer type of the token shards; 'auto' picks uint16 when the vocabulary fits, else uint32.",
        choices=("auto", "uint16", "uint32"),
    )

    def corpus_name(self) -> str:
        if self.name:
            return self.name
        if self.source == "stdlib" or self.format == "stdlib":
            return "stdlib"
        stem = Path(self.source.rstrip("/")).stem
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem) or "corpus"


@dataclass
class TokenizerConfig:
    vocab_size: int = option(
        4096, "Vocabulary size of the byte-level BPE tokenizer, special tokens included. A multiple of 64 keeps "
        "the embedding matmuls efficient.",
    )
    min_frequency: int = option(2, "A pair must occur this often to be merged.")
    train_bytes: int = option(
        20_000_000, "Train the tokenizer on at most this many bytes of the training split (0 = all of it); "
        "BPE statistics settle long before a large corpus is exhausted.",
    )


@dataclass
class ModelConfig:
    depth: int = option(
        4, "The size dial: number of transformer blocks. Width = depth x aspect_ratio, heads = width / head_dim; "
        "depth 12 gives the GPT-2-small shape (768 wide, 12 heads).",
    )
    seq_len: int = option(256, "Context length in tokens (training window and generation limit).")
    aspect_ratio: int = option(64, "Model width per layer of depth (width = depth x aspect_ratio).")
    head_dim: int = option(64, "Width of one attention head.")
    kv_group: int = option(
        2, "Query heads per key/value head (grouped-query attention; 1 = ordinary attention). When it does not "
        "divide the head count, the nearest grouping that does is used.",
    )
    qk_norm: bool = option(True, "RMS-normalise queries and keys per head (Qwen3-style); stabilises training.")
    tie_embeddings: bool = option(False, "Share the input embedding and output projection weights.")
    rope_theta: float = option(10000.0, "Base of the rotary position embedding frequencies.")


@dataclass
class TrainConfig:
    parallel: str = option(
        "ddp", "How several processes share the work: 'ddp' = every process holds the whole model and gradients "
        "are all-reduced; 'fsdp' = PyTorch's FSDP2 shards weights, gradients and optimizer state across processes, "
        "for models that do not fit one device (AdamW only: Muon orthogonalises whole matrices).",
        choices=("ddp", "fsdp"),
    )
    optimizer: str = option(
        "muon", "'muon': Muon (orthogonalised momentum) for 2-D weight matrices and AdamW for embeddings, output "
        "head and norms; 'adamw': AdamW for everything.", choices=("muon", "adamw"),
    )
    lr: float = option(1e-2, "AdamW learning rate (embeddings, head and norms; every parameter with 'adamw').")
    matrix_lr: float = option(0.02, "Muon learning rate for the 2-D weight matrices.")
    weight_decay: float = option(0.0, "Decoupled weight decay for 2-D weights (norms and embeddings never decay).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.95, "AdamW beta2.")
    muon_momentum: float = option(0.95, "Muon momentum (Nesterov).")
    warmup_steps: int = option(20, "Steps of linear learning-rate warm-up from zero.")
    decay_frac: float = option(
        0.4, "Warm-up-stable-decay: the last fraction of the run decays the learning rate linearly to "
        "min_lr_frac. Progress is measured against whichever stop limit is nearest.",
    )
    min_lr_frac: float = option(0.0, "Learning rate at the end of the decay, as a fraction of the peak.")
    batch_size: int = option(16, "Sequences per micro-batch on each device.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this value (0 = no clipping).")
    max_steps: int = option(0, "Stop after this many optimizer steps (0 = no limit).")
    max_tokens: int = option(0, "Stop after this many training tokens (0 = no limit).")
    max_flops: float = option(0.0, "Stop after this many training FLOPs (0 = no limit).")
    max_time: float = option(
        0.0, "Stop after this many seconds of training (0 = no limit). Wall-clock budgets are not bitwise "
        "reproducible; use max_steps or max_tokens where that matters.",
    )
    eval_every: int = option(100, "Validate every this many steps (and at the end); 0 = only at the end.")
    eval_batches: int = option(20, "Validation batches per evaluation (0 = the whole validation split).")
    checkpoint_every: int = option(200, "Write a checkpoint every this many steps (and at the end); 0 = only at the end.")
    keep_last: int = option(2, "How many checkpoints to keep; older ones are deleted.")
    log_every: int = option(10, "Write step metrics to the ledger every this many steps (and before each checkpoint).")
    seed: int = option(1337, "Seed for weights, data order and sampling.")
    device: str = option("auto", "'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = option(
        "auto", "Compute precision: 'auto' = bf16 autocast on GPU, fp32 on CPU.", choices=("auto", "fp32", "bf16")
    )
    compile: str = option(
        "auto", "torch.compile the model: 'auto' = on for GPU, off for CPU.", choices=("auto", "on", "off")
    )
    threads: int = option(0, "CPU threads for torch (0 = every core).")
    deterministic: bool = option(
        True, "Use deterministic kernels on CPU, so a resumed run repeats an uninterrupted one bit for bit. GPU runs "
        "always take the fastest kernels (bf16 and compiled kernels do not repeat bit for bit anyway)."
    )


@dataclass
class MeterConfig:
    device_profile: str = option(
        "", "Hardware profile for peak FLOP/s, power and price (e.g. 'h100-sxm'); empty = detect."
    )
    peak_tflops: float = option(0.0, "Override the device's peak TFLOP/s used for MFU (0 = profile or CPU probe).")
    power_watts: float = option(
        0.0, "Declared power draw used when energy cannot be measured (0 = the profile's figure); results based "
        "on it are labelled estimates.",
    )
    price_per_hour: float = option(-1.0, "Price of one device-hour in USD (-1 = the profile's default).")
    carbon_g_per_kwh: float = option(
        -1.0, "Grid carbon intensity in g CO2 per kWh (-1 = the default in assets/devices.json: 475, the world "
        "average per the IEA).",
    )


SYNC_BY = ("steps", "lr")  # SitesConfig.sync_by's choices (train/schedule.py's SyncClock)


@dataclass
class SitesConfig:
    count: int = option(
        1, "Sites trained with DiLoCo: replicas that train on their own and average what they learned every "
        "sync_every steps. 1 = ordinary training. The processes (--nproc, torchrun) are split evenly among sites; "
        "the ranks of one site are data-parallel among themselves.",
    )
    sync_every: int = option(50, "DiLoCo H: inner optimizer steps between two outer steps.")
    sync_by: str = option(
        "steps", "When the outer steps come: 'steps' every sync_every steps (DiLoCo's); 'lr' after every "
        "sync_every steps' worth of learning rate, so sync_every steps apart at the peak rate and farther apart in "
        "warm-up and decay, where the sites drift less per step, and the same bytes buy more exchanges at the peak.",
        choices=SYNC_BY,
    )
    outer_lr: float = option(0.7, "Outer learning rate (Nesterov SGD on the averaged pseudo-gradient; DiLoCo's 0.7).")
    outer_momentum: float = option(0.9, "Outer Nesterov momentum (DiLoCo's 0.9).")
    wire: str = option(
        "bf16", "Precision of the pseudo-gradients sent between sites: fp32, bf16, int8 with one fp32 scale "
        "per 256 values, or nf4 (4-bit NormalFloat levels, two per byte) with one fp32 scale per 128 values; they "
        "are always summed in fp32.", choices=("fp32", "bf16", "int8", "nf4"),
    )
    fragments: int = option(
        1, "Streaming DiLoCo: cut the model into this many fragments, exchanged at staggered steps (each carries "
        "1/fragments of the model; every fragment is still exchanged every sync_every steps).",
    )
    overlap_steps: int = option(
        0, "Overlap each exchange with this many inner steps before its outer update is applied (0 = wait for "
        "it); must be less than sync_every.",
    )
    link: str = option(
        "datacenter", "The link between sites, whose latency and bandwidth delay every cross-site transfer: a "
        "preset (datacenter, cross-region, starlink, geo-satellite, laser-isl) or 'up=15Mbit,down=100Mbit,"
        "latency=40ms'.",
    )
    drop_after: float = option(
        0.0, "Fault tolerance: > 0 runs every site as its own job, and a site that has not reached an outer step "
        "this many seconds after another did is left out of it while the others go on; a site that comes back "
        "(restarted, or late) takes the global weights at the next outer step. Site 0, which keeps the records, is "
        "never left out. Plain DiLoCo only (fragments 1, overlap_steps 0). 0 = the sites form one torchrun job and "
        "any failure ends the run.",
    )
    restarts: int = option(
        3, "Fault tolerance: how many times `lmforge train --nproc` starts a failed site again (site 0, which "
        "keeps the run's records and checkpoints, is never restarted: its failure ends the run).",
    )
    site: int = option(
        0, "Fault tolerance: this job's site, 0 .. count-1 (set by `lmforge train --nproc`; one job per site "
        "when the sites are on different machines).",
    )
    store: str = option(
        "", "Fault tolerance: HOST:PORT of the store where the sites meet (site 0 serves it). Set by `lmforge "
        "train --nproc`; give every site the same address when the sites are on different machines.",
    )


@dataclass
class RunConfig:
    name: str = option("", "Run name (a folder under <workspace>/runs); empty = a timestamped name.")
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    meter: MeterConfig = field(default_factory=MeterConfig)
    sites: SitesConfig = field(default_factory=SitesConfig)

    # -- names of the artefacts this config reads and writes in the workspace --

    def tokenizer_name(self) -> str:
        return f"{self.data.corpus_name()}-bpe{self.tokenizer.vocab_size}"

    def validate(self) -> RunConfig:
        """Check every field and the fields against each other; raise ConfigError naming the flag to change."""
        for section, f in iter_fields():
            choices = f.metadata.get("choices")
            value = getattr(getattr(self, section) if section else self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{flag(section, f.name)} is {value!r}; choose one of {', '.join(choices)}")
        positive = [("tokenizer", "vocab_size"), ("model", "depth"), ("model", "seq_len"),
                    ("model", "aspect_ratio"), ("model", "head_dim"), ("model", "kv_group"),
                    ("train", "batch_size"), ("train", "grad_accum"), ("train", "keep_last"),
                    ("train", "log_every"), ("train", "lr"), ("tokenizer", "min_frequency"),
                    ("sites", "count"), ("sites", "sync_every"), ("sites", "outer_lr"), ("sites", "fragments")]
        for section, name in positive:
            if getattr(getattr(self, section), name) <= 0:
                raise ConfigError(f"{flag(section, name)} must be positive, got {getattr(getattr(self, section), name)}")
        non_negative = [("train", n) for n in ("max_steps", "max_tokens", "max_flops", "max_time", "eval_every",
                                                "eval_batches", "checkpoint_every", "warmup_steps", "grad_clip",
                                                "weight_decay", "threads", "matrix_lr")]
        non_negative += [("tokenizer", "train_bytes"), ("meter", "peak_tflops"), ("meter", "power_watts")]
        for section, name in non_negative:
            if getattr(getattr(self, section), name) < 0:
                raise ConfigError(f"{flag(section, name)} must be >= 0, got {getattr(getattr(self, section), name)}")
        if not self.data.source.strip():
            raise ConfigError("--data.source is empty; pass a directory, a .jsonl or .parquet file, or 'stdlib'")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ConfigError(f"--data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if self.train.parallel == "fsdp" and self.train.optimizer != "adamw":
            raise ConfigError("--train.parallel fsdp needs --train.optimizer adamw (Muon orthogonalises whole "
                              "weight matrices, which FSDP shards across processes)")
        if self.train.parallel == "fsdp" and self.sites.count > 1:
            raise ConfigError("--train.parallel fsdp cannot be combined with --sites.count > 1 yet; use ddp inside "
                              "each site")
        if not 0 <= self.sites.overlap_steps < self.sites.sync_every:
            raise ConfigError(f"--sites.overlap_steps must be in [0, sync_every), got {self.sites.overlap_steps}")
        if self.sites.drop_after < 0 or self.sites.restarts < 0:
            raise ConfigError("--sites.drop_after and --sites.restarts must be >= 0")
        if self.sites.drop_after > 0 and (self.sites.fragments > 1 or self.sites.overlap_steps > 0
                                          or self.sites.sync_by != "steps"):
            raise ConfigError("--sites.drop_after (fault tolerance) works with plain DiLoCo only; set "
                              "--sites.fragments 1, --sites.overlap_steps 0 and --sites.sync_by steps")
        if self.sites.drop_after > 0 and not 0 <= self.sites.site < self.sites.count:
            raise ConfigError(f"--sites.site must be in [0, {self.sites.count}), got {self.sites.site}")
        if not 0.0 <= self.sites.outer_momentum < 1.0:
            raise ConfigError(f"--sites.outer_momentum must be in [0, 1), got {self.sites.outer_momentum}")
        if not 0.0 <= self.train.decay_frac <= 1.0 or not 0.0 <= self.train.min_lr_frac <= 1.0:
            raise ConfigError("--train.decay_frac and --train.min_lr_frac must be in [0, 1]")
        if self.data.token_dtype == "uint16" and self.tokenizer.vocab_size > 2**16:
            raise ConfigError(
                f"--tokenizer.vocab_size {self.tokenizer.vocab_size} does not fit --data.token_dtype uint16 "
                f"(at most 65536 ids); use --data.token_dtype uint32 or auto, or a smaller vocabulary"
            )
        width = self.model.depth * self.model.aspect_ratio
        if width % self.model.head_dim:
            raise ConfigError(
                f"model width {width} (--model.depth {self.model.depth} x --model.aspect_ratio "
                f"{self.model.aspect_ratio}) is not a multiple of --model.head_dim {self.model.head_dim}"
            )
        if self.model.head_dim % 2:
            raise ConfigError(f"--model.head_dim must be even for rotary embeddings, got {self.model.head_dim}")
        if self.train.device not in ("auto", "cpu", "cuda") and not self.train.device.startswith("cuda:"):
            raise ConfigError(f"--train.device is {self.train.device!r}; use auto, cpu, cuda or cuda:N")
        return self

    def require_stop_condition(self) -> None:
        t = self.train
        if not (t.max_steps or t.max_tokens or t.max_flops or t.max_time):
            raise ConfigError(
                "training has no stop condition; set --train.max_steps, --train.max_tokens, --train.max_flops "
                "or --train.max_time"
            )

    # -- serialisation --

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {
    "data": DataConfig, "tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig, "meter": MeterConfig,
    "sites": SitesConfig,
}


def flag(section: str, name: str) -> str:
    return f"--{section}.{name}" if section else f"--{name}"


def iter_fields() -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Yield (section, field) for every leaf setting; top-level fields have section ''."""
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            for sub in dataclasses.fields(SECTIONS[f.name]):
                yield f.name, sub
        else:
            yield "", f


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" if s else f.name for s, f in iter_fields()]


def field_type(cls: type, name: str) -> type:
    return typing.get_type_hints(cls)[name]


def parse_value(key: str, raw: Any, typ: type) -> Any:
    """Convert a YAML or command-line value to the field's type, with an error naming the key."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {raw!r}")
    try:
        if typ is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            value = float(raw) if isinstance(raw, str) and ("e" in raw.lower() or "." in raw) else raw
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"--{key} expects {'an integer' if typ is int else 'a number'}, got {raw!r}") from None
    if raw is None:
        raise ConfigError(f"--{key} expects text, got nothing")
    return str(raw)


def unknown_key_error(key: str, where: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; valid keys are listed by `lmforge train --help`"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a validated RunConfig from defaults, an optional YAML file and `section.field` overrides."""
    values: dict[str, Any] = {}
    valid = all_keys()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; check the --config path")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of sections (data:, model:, train:, ...)")
        for key, value in raw.items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"section '{key}' in {path} must be a mapping of settings")
                for sub, v in value.items():
                    values[f"{key}.{sub}"] = v
            else:
                values[str(key)] = value
        for key in values:
            if key not in valid:
                raise unknown_key_error(key, str(path), valid)
    for key, value in (overrides or {}).items():
        if key not in valid:
            raise unknown_key_error(key, "the command line", valid)
        values[key] = value
    return build_config(values)


def build_config(values: dict[str, Any]) -> RunConfig:
    """RunConfig from a flat {'section.field': value} mapping (typed by the fields), validated."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    top: dict[str, Any] = {}
    for key, raw in values.items():
        section, _, name = key.rpartition(".")
        cls = SECTIONS[section] if section else RunConfig
        typed = parse_value(key, raw, field_type(cls, name))
        (sections[section] if section else top)[name] = typed
    cfg = RunConfig(**top, **{name: SECTIONS[name](**kw) for name, kw in sections.items()})
    return cfg.validate()


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a saved (nested) config, e.g. from a checkpoint's config.yaml."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    valid = all_keys()
    for key in flat:
        if key not in valid:
            raise unknown_key_error(key, "the saved config", valid)
    return build_config(flat)
