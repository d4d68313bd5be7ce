"""The trackers `train.tracker` can name, checked when the config is built."""

from __future__ import annotations

from typing import Any

from trainer_lib.errors import ConfigError, did_you_mean

# tracker name -> the pip package that provides it
TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow",
                    "comet_ml": "comet-ml", "aim": "aim", "clearml": "clearml",
                    "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
TRACKER_NAMES = ("jsonl", *TRACKER_PACKAGES)


def tracker_names(spec: Any) -> list[str]:
    """`train.tracker` as a list of names (None: none), each checked against the known ones."""
    if spec is None:
        return []
    names = [spec] if isinstance(spec, str) else list(spec)
    for name in names:
        if name not in TRACKER_NAMES:
            raise ConfigError(f"train.tracker: unknown tracker {name!r}"
                              f"{did_you_mean(name, TRACKER_NAMES)} (valid: None, "
                              f"{', '.join(TRACKER_NAMES)}, or a list of them)")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.tracker names a tracker twice: {names}")
    return names


def check_installed(names: list[str]) -> None:
    """Before anything loads: every tracker asked for is importable, or say what to install."""
    import accelerate.utils

    missing = [n for n in names if n != "jsonl"
               and not getattr(accelerate.utils, f"is_{n}_available")()]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[n] for n in missing)
        raise ConfigError(f"train.tracker asks for {', '.join(missing)}, which is not installed: "
                          f"pip install {packages} (or set train.tracker to another tracker, or "
                          "null)")
