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

    def as_dict(self) -> dict:
        return {
            "samples": self.num_samples,
            "examples": self.num_examples,
            **{f"kind/{k}": v for k, v in sorted(self.kinds.items())},
            "truncated": self.truncated,
            "split": self.split,
            **{f"dropped/{k}": v for k, v in sorted(self.dropped.items())},
            "tokens": self.num_tokens,
            "loss_tokens": self.num_loss_tokens,
            "loss_token_share": round(self.num_loss_tokens / max(self.num_tokens, 1), 4),
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
        )
