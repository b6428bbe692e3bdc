"""Per-batch results on disk so a killed evaluation resumes where it stopped (JSON, never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._utils import atomic_path, writing

FORMAT = "meansparse-evaluation-state/1"
#: config keys a state may differ in and still resume: a record is reused only for the same attack name (rungs
#: are named ``attack@xF``, their settings follow from the attack's, which must match) and the same examples, so
#: a ladder with more rungs, another share or other families reuses the rungs it has in common
RESUMABLE_KEYS = ("ladder",)


def normalise(obj: Any) -> Any:
    """What ``obj`` reads back as after a JSON round trip (tuples -> lists), for comparisons."""
    return json.loads(json.dumps(obj))


class EvaluationState:
    """Finished (attack, batch) results, keyed by attack name then batch index.

    Each record holds the example indices the batch covered, so a resumed run re-uses a record only for
    exactly the same examples. Without a path nothing is written and every lookup misses.
    """

    def __init__(self, path: str | os.PathLike | None, config: dict[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.config = normalise(config)
        self.batches: dict[str, dict[str, dict[str, Any]]] = {}
        if self.path is not None:
            if self.path.exists():
                self._load()
            else:
                self._write()  # fail now, not after the first batch, if the path is not writable

    def _load(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not text at all (UnicodeDecodeError)
            raise ValueError(f"cannot read evaluation state {self.path}: not a JSON state file ({e})") from e
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found != FORMAT:
            raise ValueError(f"{self.path} is not a meansparse evaluation state (format {found!r}); use another "
                             "--state / state_path or delete the file")
        stored = data.get("config", {})
        diff = sorted(k for k in set(stored) | set(self.config)
                      if stored.get(k) != self.config.get(k) and k not in RESUMABLE_KEYS)
        if diff:
            raise ValueError(
                f"evaluation state {self.path} was written for a different evaluation (differs in: "
                f"{', '.join(diff)}); use another state_path or delete the file to start over"
            )
        self.batches = data.get("batches", {})

    def get(self, attack: str, batch: int, indices: list[int]) -> dict[str, Any] | None:
        record = self.batches.get(attack, {}).get(str(batch))
        if record is None or record["indices"] != indices:
            return None
        return record

    def put(self, attack: str, batch: int, record: dict[str, Any]) -> None:
        self.batches.setdefault(attack, {})[str(batch)] = record
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a kill mid-write leaves the previous state intact, and so does a failed write (a full disk)
        with writing(self.path, "the previous state file is kept"), atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, "config": self.config, "batches": self.batches}))
