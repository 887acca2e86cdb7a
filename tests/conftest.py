import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("EPO_DATA_DIR", str(SHARED_DATA))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def epo_home(tmp_path_factory):
    """Runs and checkpoints made with the default locations go to a fresh folder, never to
    the user's ~/.epo (the model cache, $EPO_CACHE_DIR, stays shared)."""
    saved = {name: os.environ.get(name) for name in ("EPO_HOME", "MLFLOW_TRACKING_URI")}
    home = tmp_path_factory.mktemp("epo-home")
    os.environ["EPO_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield home
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tokenizer():
    from epo_cli.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_model():
    from epo_cli.models import load_causal_lm

    return load_causal_lm("tiny", seed=0)
