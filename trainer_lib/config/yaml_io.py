"""The one YAML reader, for config files and `key=value` overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from trainer_lib.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but `1e-5` is a float (YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[0-9][0-9_]*[eE][-+]?[0-9]+
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)

YAMLError = yaml.YAMLError


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict:
    """A config file as a dict ({} when empty); a ConfigError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}{_where(e)}: not valid YAML: {_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at byte "
                          f"{e.start}); save the file as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got "
                          f"{type(data).__name__}")
    return data


def _where(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _problem(error: yaml.YAMLError) -> str:
    """The parser's several lines (with copies of the file's text) as one: what it found, and
    where the construct it was reading starts."""
    problem = getattr(error, "problem", None)
    if not problem:
        return str(error).splitlines()[0]
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and start is not None:
        problem += f" ({context} that starts at line {start.line + 1})"
    elif context:
        problem += f" ({context})"
    if "'\\t'" in problem:
        problem += "; YAML indents with spaces, not tabs"
    return problem


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)
