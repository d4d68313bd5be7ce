"""What happened to the samples on their way to the model: the data report a run prints."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class DataReport:
    """What happened to the samples on their way to the model."""

    kinds: Counter = field(default_factory=Counter)
    num_samples: int = 0
    num_examples: int = 0
    truncated: int = 0
    split: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    num_tokens: int = 0
    num_loss_tokens: int = 0
    stream_checked: int = 0  # a stream: the report covers only its first samples, checked up front
    # a mixture: source name -> {"examples": drawn per epoch, "available": examples it holds}
    sources: dict = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)  # remark (DataRecipe.note) -> records

    # what each remark means, as the summary says it (one record, several)
    NOTES = {"last_turn_not_assistant": (
        "conversation ends with a turn after the assistant's last, which trains nothing",
        "conversations end with a turn after the assistant's last, which trains nothing")}

    @classmethod
    def combined(cls, reports: list["DataReport"]) -> "DataReport":
        """One report of several prepared sources (a mixture's), their counts added."""
        out = cls()
        for r in reports:
            out.kinds.update(r.kinds)
            out.dropped.update(r.dropped)
            out.notes.update(r.notes)
            for name in ("num_samples", "num_examples", "truncated", "split", "num_tokens",
                         "num_loss_tokens"):
                setattr(out, name, getattr(out, name) + getattr(r, name))
        return out

    def as_dict(self) -> dict:
        return {
            "samples": self.num_samples,
            "examples": self.num_examples,
            **{f"kind/{k}": v for k, v in sorted(self.kinds.items())},
            "truncated": self.truncated,
            "split": self.split,
            **{f"dropped/{k}": v for k, v in sorted(self.dropped.items())},
            **{f"notes/{k}": v for k, v in sorted(self.notes.items())},
            "tokens": self.num_tokens,
            "loss_tokens": self.num_loss_tokens,
            "loss_token_share": round(self.num_loss_tokens / max(self.num_tokens, 1), 4),
            **{f"sources/{name}/{k}": v for name, counts in self.sources.items()
               for k, v in counts.items()},
        }

    def summary(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.kinds.items()))
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{v} {k}" for k, v in sorted(self.dropped.items()))
        share = 100 * self.num_loss_tokens / max(self.num_tokens, 1)
        scope = (f" (a stream; its first {self.stream_checked} samples)"
                 if self.stream_checked else "")
        return (
            f"data{scope}: {self.num_samples} samples ({kinds}) -> {self.num_examples} examples, "
            f"{self.num_tokens:,} tokens, {share:.1f}% carry loss; "
            f"{self.truncated} truncated, {self.split} split, {dropped} dropped"
            + (f" ({reasons})" if dropped else "")
            + "".join(f"; {n} {self._note(k, n)}" for k, n in sorted(self.notes.items()))
            + self._mixture_summary()
        )

    def _mixture_summary(self) -> str:
        if not self.sources:
            return ""
        parts = []
        for name, c in self.sources.items():
            n, held = c["examples"], c["available"]
            how = ("all" if n == held else "subsampled" if n < held
                   else f"each {n / held:.3g} times")
            parts.append(f"{name} {n:,} of {held:,} ({how})")
        total = sum(c["examples"] for c in self.sources.values())
        return f"\nmixture: {total:,} examples per epoch: " + ", ".join(parts)

    def _note(self, name: str, count: int) -> str:
        one, several = self.NOTES.get(name, (name.replace("_", " "),) * 2)
        return one if count == 1 else several

    def too_few(self, needed: int, seq_length: int) -> str:
        """The error of a run left with fewer than `needed` examples: what happened to the
        samples, and what to change."""
        head = ("no sample is left to train on" if self.num_examples == 0 else
                f"too few examples to train on ({self.num_examples}; at least {needed} are "
                "needed)")
        fixes = []
        if self.dropped.get("too_long"):
            fixes.append(f"raise train.seq_length (now {seq_length}), or set "
                         'method.overlong="truncate" to keep the samples longer than it')
        if self.dropped.get("no_loss_tokens_after_truncation"):
            fixes.append(f"raise train.seq_length (now {seq_length}): truncating to it left no "
                         "token that carries loss")
        if self.dropped.get("no_loss_tokens"):
            fixes.append("give samples with something to learn: a non-empty completion, or an "
                         "assistant turn with text (method.loss_on decides which turns train)")
        if not fixes:
            fixes.append(f"give at least {needed} samples")
        summary = self.summary().replace("\n", "; ")  # one line
        return f"{head}: {summary}; {'; '.join(fixes)}"
