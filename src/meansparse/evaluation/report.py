"""The evaluation result: one dataclass, serialisable to JSON (lossless) and Markdown (for people)."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RUN_KEY", "Report", "attack_budget", "data_line", "model_line", "operator_path"]

_BUDGET_KEYS = ("steps", "restarts", "queries", "n_target_classes", "lam", "step_size", "loss")
_SURROGATES = {
    "sg": "surrogate-gradient BPDA (soft-threshold backward, real forward)",
    "smooth": "the smooth surrogate model (soft threshold forward and backward; judged on the real model)",
    "ens": "the real model's values with the mean of the surrogate's and the base model's gradients",
}


def attack_budget(settings: dict[str, Any]) -> str:
    """One attack's budget in words, from its ``settings()``: steps, restarts, queries, targets, and whether
    an AutoAttack is the standard one."""
    if "inner" in settings:
        inner = settings["inner"]
        how = _SURROGATES.get(settings.get("surrogate"), "BPDA (identity gradient through the operators)")
        if "sharpness" in settings:
            how += f", sharpness {', '.join(f'{k:g}' for k in settings['sharpness'])} in turn"
        return f"{how} of {inner.get('name')}: {attack_budget(inner)}"
    if isinstance(settings.get("start"), dict):
        start = settings["start"]
        return (f"Square from the candidates of {start.get('name')} ({attack_budget(start)}): "
                f"queries {settings.get('queries')}, p init {settings.get('p_init'):.4g}")
    if "sources" in settings:
        base = "the base model" if settings.get("base") == "base_model" else "the model itself at α = 0"
        return f"crafted on {base} with " + " then ".join(f"{s.get('name')} ({attack_budget(s)})"
                                                          for s in settings["sources"])
    parts = [f"{k.replace('_', ' ')} {settings[k]:.4g}" if isinstance(settings[k], float) else
             f"{k.replace('_', ' ')} {settings[k]}" for k in _BUDGET_KEYS if k in settings]
    if settings.get("version") == "standard":
        which = ("standard AutoAttack" if settings.get("standard") else
                 "custom AutoAttack (reduced budget: not the standard AutoAttack)")
        return f"{which} (APGD-CE, APGD-T, FAB-T, Square): " + ", ".join(parts)
    return ", ".join(parts) or "no budget parameters"


def data_line(data: dict[str, Any]) -> str:
    """``{"name", "split", "n", "of", "seed"}`` in words."""
    split = f", {data['split']} split" if data.get("split") else ""
    text = f"{data.get('name')}{split}: {data.get('n')}"
    if data.get("of") is not None:
        text += f" of {data['of']} images"
        if data.get("n") != data.get("of"):
            text += f" (random sample, seed {data.get('seed')})"
    else:
        text += " images"
    return text


def model_line(command: dict[str, Any]) -> str:
    """The checkpoint, MeanSparse state file and α an evaluation ran on, in words."""
    text = f"checkpoint {command.get('checkpoint')}"
    if command.get("meansparse"):
        text += f", MeanSparse state {command['meansparse']}"
    else:
        text += ", no MeanSparse state"
    alphas = command.get("alphas")
    if alphas:
        shown = f"{alphas[0]:g}" if len(alphas) == 1 else f"per site, {min(alphas):g} to {max(alphas):g}"
        source = "set by --alpha" if command.get("alpha") is not None else "as stored in the state"
        text += f", α {shown} ({source})"
    elif command.get("alpha") is not None:
        text += f", α set to {command['alpha']:g}"
    return text


# Fields of ``metadata["run"]`` describe one execution (timings, how many batches were resumed), not the
# result; ``Report.comparable()`` drops them so two runs can be compared for equality.
RUN_KEY = "run"


def operator_path(decision: Mapping[str, Any]) -> str:
    """The path a run took in words ("eager operator", "fused", "whole model compiled"), from its recorded
    decision: ``metadata["run"]["execution"]`` (its "description"), or the older ``["fuse"]`` record (whose
    "path" is the words; the oldest have no "path")."""
    return (decision.get("description") or decision.get("path")
            or ("fused" if decision.get("fuse") else "eager operator"))


@dataclass
class Report:
    """Robustness of one model on one set of examples under one threat model.

    ``robust_accuracy[a]`` is attack ``a`` on its own when ``mode == "individual"`` (every attack saw every
    clean-correct example); in ``"cascade"`` mode an attack only saw the examples still robust after the
    attacks before it, so its number is the cumulative accuracy after it (AutoAttack's convention) and
    ``breakdown`` says how many examples it saw and broke. ``worst_case_accuracy`` counts an example as
    robust only if it is classified correctly and no attack broke it; it is the number to quote.

    ``robust_masks[a][i]``: 1 robust to ``a``, 0 broken by ``a``, -1 not attacked (clean error, or already
    broken in cascade mode).
    """

    clean_accuracy: float
    robust_accuracy: dict[str, float]
    worst_case_accuracy: float
    n_examples: int
    norm: str
    eps: float
    attacks: list[str]
    mode: str
    clean_correct: list[bool] = field(default_factory=list)
    robust_masks: dict[str, list[int]] = field(default_factory=dict)
    worst_case_robust: list[bool] = field(default_factory=list)
    breakdown: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sanity: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    ladder: list[dict[str, Any]] = field(default_factory=list)
    converged: bool | None = None
    indicators: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"not a meansparse Report: unknown fields {sorted(unknown)}")
        return cls(**data)

    def comparable(self) -> dict[str, Any]:
        """The report without run-specific timing: equal for two runs with the same inputs and seed,
        and for an interrupted-then-resumed run and an uninterrupted one."""
        d = copy.deepcopy(self.to_dict())
        d["metadata"].pop(RUN_KEY, None)
        return d

    # ------------------------------------------------------------------------------------------- markdown
    def to_markdown(self) -> str:
        pct = lambda v: f"{100 * v:.2f} %"  # noqa: E731
        meta = self.metadata
        lines = [
            "# Robustness report",
            "",
            f"- threat model: {self.norm}, eps = {self.eps:.6g}; {self.n_examples} examples; mode: {self.mode}",
            f"- clean accuracy: **{pct(self.clean_accuracy)}**",
            f"- worst-case robust accuracy (over all attacks, per example): **{pct(self.worst_case_accuracy)}**",
        ]
        data = meta.get("data")
        if data:
            lines.append(f"- data: {data_line(data)}")
        command = meta.get("command")
        if command:
            lines.append(f"- model: {model_line(command)}")
        if "model_hash" in meta:
            lines.append(f"- model sha256: `{meta['model_hash'][:16]}…`; seed {meta.get('seed')}")
        run = meta.get(RUN_KEY, {})
        if "wall_time_s" in run:
            lines.append(f"- wall time: {run['wall_time_s']:.1f} s")
        decision = run.get("execution") or run.get("fuse")  # "fuse": the record of older reports
        if decision:
            lines.append(f"- operator: {operator_path(decision)} ({decision['reason']})")
        lines += ["", "| attack | kind | attacked | broken | robust accuracy | worst case after it |",
                  "|---|---|---:|---:|---:|---:|"]
        column_note = "on its own" if self.mode == "individual" else "cumulative"
        for row in self.breakdown:
            lines.append(
                f"| {row['attack']} | {row['kind']} | {row['n_attacked']} | {row['n_broken']} | "
                f"{pct(row['robust_accuracy'])} | {pct(row['cumulative_accuracy'])} |"
            )
        lines += ["", f"Robust accuracy is {column_note} ({self.mode} mode), over all {self.n_examples} examples"
                  + ("; rung rows (@xF) are cumulative." if self.ladder and len(self.ladder) > 1 else "."), ""]
        lines += self._ladder_lines(pct) + self._indicator_lines()
        settings = meta.get("attack_settings")
        if settings:
            lines += ["## Attacks and budgets", ""]
            lines += [f"- {name}: {attack_budget(s)}" for name, s in settings.items()] + [""]
        if self.warnings:
            lines += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        if self.sanity:
            lines += ["## Sanity checks", ""]
            for s in self.sanity:
                lines.append(f"- [{'pass' if s['passed'] else 'FAIL'}] {s['check']}: {s['message']}")
            lines.append("")
        versions = meta.get("versions")
        if versions:
            lines += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
        return "\n".join(lines)

    def _ladder_lines(self, pct: Any) -> list[str]:
        if not self.ladder:
            return []
        verdict = {True: "**converged**", False: "**not converged**", None: "single rung"}[self.converged]
        lines = [f"## Budget ladder: {verdict}", "",
                 "| rung | budget | attacks | examples attacked | broken | worst case after |",
                 "|---:|---:|---|---:|---:|---:|"]
        for r in self.ladder:
            lines.append(f"| {r['rung']} | x{r['factor']} | {', '.join(r['attacks'])} | {r['n_attacked']} | "
                         f"{r['n_broken']} | {pct(r['worst_case_after'])} |")
        settings = self.metadata.get("ladder") or {}
        share, families = settings.get("share"), settings.get("families") or ["masking-proof"]
        if share is not None:
            lines.append("")
            lines.append(f"Each rung repeats the attacks of the families {', '.join(families)} with a larger budget "
                         f"on the examples still robust; converged means the last rung broke at most {100 * share:g} "
                         "% of the examples.")
        return lines + [""]

    def _indicator_lines(self) -> list[str]:
        if not self.indicators:
            return []
        lines = ["## Attack-failure indicators", ""]
        for i in self.indicators:
            lines.append(f"- [{i['verdict']}] {i['name']}: {i['value']} — {i['detail']}")
        return lines + [""]
