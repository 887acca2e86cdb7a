"""ALFWorld on the real TextWorld engine (text mode) over the json_2.1.1 game files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path, PurePath

from epo_cli.envs.base import EnvStep, TaskInstance
from epo_cli.paths import cache_dir

# The paper's protocol: split name -> folder under json_2.1.1.
SPLITS = {"train": "train", "iid": "valid_seen", "ood": "valid_unseen"}
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
ARCHIVES = ("alfworld-json_2.1.1-valid.tar.gz", "alfworld-json_2.1.1-train.tar.gz")
GAME_FILE = "game.tw-pddl"
HOW_TO_FIX = (
    "run `epo data prepare alfworld` (downloads the games), point ALFWORLD_DATA (or env.data_dir) "
    "at the folder `alfworld-download` made, or run `epo data prepare alfworld --from DIR_WITH_ARCHIVES`"
)
DOWNLOAD_SCRIPT = "alfworld-download"  # the official download, installed with the alfworld package
RELEASES_URL = "https://github.com/alfworld/alfworld/releases"


def task_type_of(folder_name: str) -> str:
    """The task type is the prefix of a task folder's name."""
    for task_type in TASK_TYPES:
        if folder_name.startswith(task_type):
            return task_type
    raise ValueError(f"ALFWorld task folder {folder_name!r} has no known task type prefix")


def prepare(source: Path, target: Path) -> Path:
    """Extract the json_2.1.1 archives found in ``source`` into ``target`` (idempotent)."""
    archives = [Path(source) / name for name in ARCHIVES if (Path(source) / name).exists()]
    if not archives:
        raise FileNotFoundError(f"no ALFWorld archives ({', '.join(ARCHIVES)}) in {source}")
    target.mkdir(parents=True, exist_ok=True)
    for archive in archives:
        marker = target / f".extracted-{archive.name}"
        if marker.exists():
            continue
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        marker.write_text("ok\n")
    return target


def default_download_dir() -> Path:
    """Where `alfworld-download` puts the data unless ``$ALFWORLD_DATA`` says otherwise."""
    return Path.home() / ".cache" / "alfworld"


def download_command(target: Path) -> list[str]:
    """`alfworld-download --data-dir target`, found beside this Python or on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which(DOWNLOAD_SCRIPT, path=search)
    if script is None:
        raise FileNotFoundError(f"`{DOWNLOAD_SCRIPT}` not found: install the alfworld package (pip install alfworld)")
    return [sys.executable, script, "--data-dir", str(target)]


def download_urls(command: list[str]) -> list[str]:
    """The game files' URLs as the download script names them (JSON_FILES_URL, ...)."""
    try:
        source = Path(command[1]).read_text()
    except (IndexError, OSError, UnicodeDecodeError):
        return []
    return re.findall(r'^(?:JSON|PDDL|TW_PDDL)_FILES_URL = "([^"]+)"', source, flags=re.MULTILINE)


def download(target: Path) -> Path:
    """Run the official download into ``target``; when it fails (offline, say), raise a
    one-line error saying where to get the files instead."""
    command = download_command(target)
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        reason = ([line for line in result.stderr.splitlines() if line.strip()] or [f"exit status {result.returncode}"])[-1]
        urls = ", ".join(download_urls(command)) or RELEASES_URL
        raise ConnectionError(
            f"`{DOWNLOAD_SCRIPT}` failed ({reason.strip()[:200]}); on a machine that is online, run "
            f"`{DOWNLOAD_SCRIPT} --data-dir DIR` or fetch {urls} and unzip them into DIR, then copy DIR here and "
            "set ALFWORLD_DATA=DIR; with the json_2.1.1 tar.gz archives: `epo data prepare alfworld --from DIR_WITH_ARCHIVES`"
        )
    return target


def resolve_root(candidates: list[Path], cache: Path) -> Path:
    """The first candidate holding ``json_2.1.1``; a candidate holding the archives is
    extracted into ``cache`` first."""
    for candidate in candidates:
        if (candidate / "json_2.1.1").is_dir():
            return candidate
        if any((candidate / name).exists() for name in ARCHIVES):
            return prepare(candidate, cache)
    looked = ", ".join(str(c) for c in candidates) or "(nowhere)"
    raise FileNotFoundError(f"ALFWorld data not found (looked in: {looked}); {HOW_TO_FIX}")


@lru_cache(maxsize=8)
def _games(root: str, folder: str) -> tuple[str, ...]:
    return tuple(sorted(str(p.relative_to(root)) for p in (Path(root) / "json_2.1.1" / folder).glob(f"*/*/{GAME_FILE}")))


def load_split(env: str, root: Path, split: str) -> list[TaskInstance]:
    """The games of a split under the data folder ``root`` (:func:`find_data`), in path order."""
    if split not in SPLITS:
        raise ValueError(f"unknown ALFWorld split {split!r}; expected one of {sorted(SPLITS)}")
    games = _games(str(root), SPLITS[split])
    if not games:
        raise FileNotFoundError(f"ALFWorld split {split!r}: no {GAME_FILE} files under {Path(root) / 'json_2.1.1' / SPLITS[split]}; {HOW_TO_FIX}")
    return [TaskInstance("alfworld", task_type_of(Path(g).parts[2]), str(Path(root) / g), 0) for g in games]


def split_feedback(feedback: str) -> tuple[str, str]:
    """(observation, task) from the opening text of a game."""
    text = feedback.replace("-= Welcome to TextWorld, ALFRED! =-", "").strip()
    if "Your task is to:" in text:
        observation, task = text.split("Your task is to:", 1)
        return observation.strip(), task.strip()
    return text, ""


def install_textgen_cache() -> None:
    """Memoize TextWorld's text-grammar parsing (idempotent).

    Profiling a step shows most of its time in ``textgen._parse_and_convert``: every
    admissible command and every feedback sentence re-parses the same few grammar
    templates with tatsu. The parse depends on its text only, so it is cached; callers
    get a fresh list of shallow symbol copies, since ``derive`` sets each top-level
    symbol's context. A test checks whole games give identical text with and without it.
    """
    import copy

    import textworld.envs.pddl.textgen as textgen

    if getattr(textgen._parse_and_convert, "epo_cached", False):
        return
    parse = textgen._parse_and_convert
    cache: dict = {}

    def cached_parse(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = parse(*args, **kwargs)
        return [copy.copy(symbol) for symbol in cache[key]]

    cached_parse.epo_cached = True
    cached_parse.uncached = parse
    textgen._parse_and_convert = cached_parse


class AlfWorldEngine:
    """One TextWorld engine, reused across games (``load`` then ``reset``).

    A command that is not among the admissible commands is passed to the engine (which
    answers "Nothing happens." and changes nothing) and reported as not accepted.
    """

    def __init__(self, with_planner: bool = False):
        self.with_planner = with_planner
        self._env = None
        self._admissible: list[str] = []
        self.plan: list[str] = []

    def _start(self, game: str):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        install_textgen_cache()
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"], policy_commands=self.with_planner)
        return textworld.start(game, request_infos=infos, wrappers=[AlfredDemangler(), AlfredInfos])

    def reset(self, task: TaskInstance) -> EnvStep:
        game = str(task.task_id)
        if not os.path.exists(game):
            raise FileNotFoundError(f"ALFWorld game file {game} is missing")
        if self._env is None:
            self._env = self._start(game)
        else:
            self._env.load(game)
        state = self._env.reset()
        self._admissible = list(state["admissible_commands"])
        self.plan = list(state.get("policy_commands") or []) if self.with_planner else []
        observation, description = split_feedback(state.feedback)
        return EnvStep(observation=observation, actions=self._admissible, task_description=description)

    def step(self, action: str) -> EnvStep:
        accepted = action in self._admissible
        state, _, done = self._env.step(action)
        self._admissible = list(state["admissible_commands"])
        won = bool(state["won"])
        return EnvStep(
            observation=state.feedback.strip(),
            done=bool(done) or won,
            won=won,
            score=float(won),
            actions=self._admissible,
            accepted=accepted,
        )

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def data_candidates(configured: Path | None) -> list[Path]:
    """``env.data_dir`` alone when set; else ``$ALFWORLD_DATA``, ``$EPO_DATA_DIR/alfworld``,
    ``~/.cache/alfworld`` (where `alfworld-download` puts the games by default), then the
    epo cache (where archives are extracted)."""
    if configured:
        return [Path(configured)]
    found = [Path(os.environ[name]) / sub for name, sub in (("ALFWORLD_DATA", ""), ("EPO_DATA_DIR", "alfworld"))
             if os.environ.get(name)]
    return [*found, default_download_dir(), _extracted()]


def _extracted() -> Path:
    return cache_dir() / "data" / "alfworld"


def find_data(configured: Path | None) -> Path:
    """The folder holding ``json_2.1.1`` (archives found on the way are extracted first)."""
    return resolve_root(data_candidates(configured), _extracted())


def make_engine(env: str, options: dict) -> AlfWorldEngine:
    return AlfWorldEngine()


def task_types(env: str) -> tuple[str, ...]:
    return TASK_TYPES


def task_name(task: TaskInstance) -> str:
    """A game by its split, task and trial folders (not where the data lives)."""
    return "/".join(PurePath(str(task.task_id)).parts[-4:-1])
