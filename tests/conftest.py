import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TRAINER_LIB_TEST_THREADS", "2")))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def fixtures_path() -> Path:
    return Path(os.environ.get("TRAINER_LIB_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch) -> Path:
    """Prepared data is cached in a folder of each test's own (never the user's ~/.cache);
    subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("data-cache")
    monkeypatch.setenv("TRAINER_LIB_DATA_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = fixtures_path()
    if not path.is_dir():
        pytest.skip(f"real-data fixtures not found at {path} (set TRAINER_LIB_FIXTURES)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised Llama (hidden 32, 2 layers) with a BPE tokenizer trained on the
    shipped instruction set; built once per test session."""
    from trainer_lib.model.embedded import build_tiny_llama, load_default_samples

    texts = [v for row in load_default_samples() for v in row.values()]
    texts += [f"word{i} token{i}" for i in range(200)]
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    return build_tiny_llama(folder, texts, hidden_size=32, num_layers=2, num_heads=4,
                            vocab_size=512)


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """An SFT config for fast tests: the tiny model, no progress bar, files under tmp_path.
    Unpacked, so that one sample is one batch row and step counts follow from sample counts;
    tests of packing turn it on."""
    from trainer_lib import default_sft_config

    return default_sft_config().evolve(
        model=dict(model_path=tiny_model_dir),
        train=dict(seq_length=64, batch_size=4, epochs=1, total_steps=10, log_interval=1,
                   eval_interval=1000, progress_bar=False,
                   checkpoint_dir=str(tmp_path / "ckpts"), logging_dir=str(tmp_path / "logs")),
        optimizer=dict(kwargs=dict(lr=1e-3)),
        scheduler=dict(name="constant"),
        method=dict(packing=False),
    )
