"""The workspace: one folder holding everything lmforge produces.

    <workspace>/
      corpora/<corpus>/            train.jsonl, val.jsonl, stats.json      (lmforge corpus build)
      tokenizers/<corpus>-bpe<V>/  tokenizer.json, meta.json               (lmforge tokenizer train)
      shards/<corpus>-bpe<V>/      train.bin, val.bin, index.json          (lmforge prepare)
      runs/<run>/                  config.yaml, checkpoints/step_XXXXXXXX/ (lmforge train)
      ledger.db                    runs, step metrics, artifacts, requests (every verb)
      hardware.json                cached CPU peak-FLOP/s probe

Location, first that is set: the --workspace flag, the LMFORGE_HOME environment variable, ./lmforge-work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKSPACE = "lmforge-work"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, flag: str | None = None) -> Workspace:
        root = flag or os.environ.get("LMFORGE_HOME") or DEFAULT_WORKSPACE
        return cls(Path(root).expanduser().absolute())

    def corpus_dir(self, name: str) -> Path:
        return self.root / "corpora" / name

    def tokenizer_dir(self, name: str) -> Path:
        return self.root / "tokenizers" / name

    def shards_dir(self, name: str) -> Path:
        return self.root / "shards" / name

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.db"

    @property
    def probe_cache(self) -> Path:
        return self.root / "hardware.json"
