"""The built-in methods. Each registers itself with `@register_trainer` in its trainer module,
as a method of one's own does; importing them here is the full list."""

from trainer_lib.methods import kto, sft

__all__ = ["kto", "sft"]
