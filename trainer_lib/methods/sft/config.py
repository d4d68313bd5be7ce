"""SFT's settings (`config.method` of an SFT run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer_lib.config.sections import MethodConfig


@dataclass
class SFTConfig(MethodConfig):
    name: str = "sft"
    text_key: str = "text"
    input_key: str = "prompt"
    output_key: str = "completion"
    # For conversations: "assistant" (every assistant turn), "last_assistant", or "all" tokens.
    loss_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    # A conversation whose last turn is not the assistant's (a user's question left unanswered):
    # False trains it as it is and the data report counts it; True refuses it, naming it.
    require_assistant_last: bool = False
    add_eos: bool = True
    packing: bool = True
    # An example longer than seq_length: "truncate" it, "drop" it, or "split" it (text only).
    overlong: Literal["truncate", "drop", "split"] = "truncate"
    group_by_length: bool = True  # for unpacked batches
