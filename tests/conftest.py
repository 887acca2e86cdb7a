import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("EPO_DATA_DIR", str(SHARED_DATA))
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Under CI the test data must be there: a missing game set fails the session, never skips.
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOW_TO_INCLUDE_ALFWORLD = ("to include them: `epo data prepare alfworld` (downloads the games: the json_2.1.1 "
                           "archives are 31 MB, 337 MB extracted), or set ALFWORLD_DATA=DIR or EPO_DATA_DIR=DIR "
                           "(holding alfworld/)")


def _alfworld_missing() -> str | None:
    """Why ALFWorld's games cannot be found (the registry's one-line error), or None."""
    from epo_cli.envs.registry import DataError, data_dir

    try:
        data_dir("alfworld", None)
    except DataError as err:
        return str(err)
    return None


def pytest_sessionstart(session):
    session.config.alfworld_missing = _alfworld_missing()
    missing = [session.config.alfworld_missing] if session.config.alfworld_missing else []
    if not (SHARED_DATA / "scienceworld" / "L0_idx.json").exists():
        missing.append(f"the paper's ScienceWorld split files are not in {SHARED_DATA / 'scienceworld'}")
    if CI and missing:
        pytest.exit(f"CI=true and the test data is missing: {'; '.join(missing)}", returncode=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Outside CI, a test stopped by the missing ALFWorld games is reported as skipped, all
    of them under one location, so that ``-rs`` sums them up in one line."""
    outcome = yield
    report = outcome.get_result()
    if item.config.alfworld_missing and report.failed and call.excinfo is not None \
            and "ALFWorld data not found" in str(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (__file__, 0, f"Skipped: ALFWorld games not found; {HOW_TO_INCLUDE_ALFWORLD}")


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


@pytest.fixture
def record_gradients(monkeypatch):
    """``record_gradients(learner, module)``: the learner's optimizer steps are replaced by one
    that records ``module``'s gradients (before clipping) and does not step; returns the list
    the gradients of each step are appended to, as {name: gradient}."""
    from epo_cli.trainables import OptimizerStep

    def install(learner, module) -> list[dict]:
        recorded = []

        class Recording(OptimizerStep):
            def __call__(self, norms) -> bool:
                recorded.append({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
                return False  # not stepped

        monkeypatch.setattr(learner, "optimizer_step", Recording(learner.optimizers, learner.clip_groups, 1.0))
        return recorded

    return install
