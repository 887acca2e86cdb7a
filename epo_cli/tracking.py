"""Run tracking: MLflow (a SQLite store under the epo home by default, metrics in one
batch per step), or plain JSONL files for machines without MLflow (``tracking.backend``),
mirrored to Weights & Biases with ``tracking.wandb`` (wandb_mirror.py)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from epo_cli.paths import epo_home

SQLITE_PREFIX = "sqlite:///"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; raised before any training starts."""


def resolve_uri(uri: str | None, backend: str = "mlflow") -> str:
    """MLflow: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``$EPO_HOME/mlflow.db`` (its
    folder created). JSONL: the folder ``uri``, else ``$EPO_HOME/runs``."""
    if backend == "jsonl":
        return str(Path(uri).expanduser().absolute() if uri else epo_home() / "runs")
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return uri or os.environ["MLFLOW_TRACKING_URI"]
    home = epo_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{home / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """A SQLite store keeps a new experiment's artifacts beside its database file (MLflow's
    own default is ./mlruns of whatever directory the experiment was created from)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    database = Path(uri.removeprefix(SQLITE_PREFIX).split("?", 1)[0]).absolute()
    return (database.parent / "mlartifacts" / experiment).as_uri()


def connect(uri: str | None, experiment: str):
    """(client, experiment id) for a store, creating the experiment if needed; any store
    failure becomes a TrackingError naming the URI."""
    from mlflow.tracking import MlflowClient

    resolved = resolve_uri(uri)
    try:  # a client of its own: mlflow.set_tracking_uri would also set $MLFLOW_TRACKING_URI for the process
        client = MlflowClient(resolved)
        found = client.get_experiment_by_name(experiment)
        if found:
            return client, found.experiment_id
        return client, client.create_experiment(experiment, artifact_location=artifact_location(resolved, experiment))
    except Exception as err:
        raise TrackingError(f"MLflow store {resolved} is not usable: {str(err).splitlines()[0]}") from None


class Tracker:
    """One MLflow run. Metrics go through ``log_batch`` (one call per step)."""

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str | None,
        run_id: str | None = None,
        resume: bool = True,
        tags: dict[str, str] | None = None,
    ):
        """Create a run, or attach to ``run_id`` (marking it RUNNING again if ``resume``)."""
        self.uri = resolve_uri(uri)
        self.client, experiment_id = connect(uri, experiment)
        try:
            if run_id is None:
                run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            else:
                run = self.client.get_run(run_id)
                if resume:
                    self.client.update_run(run_id, status="RUNNING")
        except Exception as err:  # any store failure must stop the run before training
            raise TrackingError(f"MLflow store {self.uri} is not usable: {str(err).splitlines()[0]}") from None
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        self.run_name = run.info.run_name

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class JsonlTracker:
    """One run as plain files, for a machine without MLflow (``tracking.backend: jsonl``):
    ``<root>/<experiment>/<run_id>/`` holds ``run.json`` (name, tags, status),
    ``params.json``, ``metrics.jsonl`` (one line per logged step) and the artifacts
    (``spec.yaml``, ``episodes/*.jsonl``, which ``epo show FILE`` reads)."""

    def __init__(
        self,
        root: str,
        experiment: str,
        run_name: str | None,
        run_id: str | None = None,
        resume: bool = True,
        tags: dict[str, str] | None = None,
    ):
        self.uri = root
        self.experiment_id = experiment
        self.run_id = run_id or uuid.uuid4().hex
        self.folder = Path(root) / experiment / self.run_id
        info_file = self.folder / "run.json"
        if run_id is not None:
            if not info_file.exists():
                raise TrackingError(f"run {run_id}: no {info_file}")
            self.info = json.loads(info_file.read_text())
            if resume:
                self._set_status("RUNNING")
        else:
            self.folder.mkdir(parents=True)
            self.info = {"run_id": self.run_id, "run_name": run_name or self.run_id[:8], "tags": tags or {},
                         "start_time": time.time(), "status": "RUNNING"}
            self._write_info()
        self.run_name = self.info["run_name"]

    def _write_info(self) -> None:
        staged = self.folder / "run.json.tmp"
        staged.write_text(json.dumps(self.info, indent=1))
        staged.replace(self.folder / "run.json")

    def _set_status(self, status: str) -> None:
        self.info["status"] = status
        self._write_info()

    def log_params(self, params: dict[str, Any]) -> None:
        path = self.folder / "params.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**saved, **{k: str(v) for k, v in params.items()}}, indent=1))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        line = json.dumps({"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}})
        with open(self.folder / "metrics.jsonl", "a") as out:
            out.write(line + "\n")

    def log_text(self, text: str, artifact_file: str) -> None:
        target = self.folder / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def finish(self, status: str = "FINISHED") -> None:
        self._set_status(status)


RunTracker = Tracker | JsonlTracker


def read_jsonl_metrics(run_folder: Path) -> list[dict[str, float]]:
    """The per-step metric lines a :class:`JsonlTracker` wrote, in order."""
    path = Path(run_folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_store(tracking) -> None:
    """Fail before any work when ``tracking`` (a TrackingSpec) cannot record a run."""
    import importlib.util

    if tracking.wandb and importlib.util.find_spec("wandb") is None:
        raise TrackingError("tracking.wandb: the wandb package is not installed (pip install 'epo-cli[wandb]')")
    if tracking.backend == "mlflow":
        connect(tracking.uri, tracking.experiment)
        return
    folder = Path(resolve_uri(tracking.uri, "jsonl")) / tracking.experiment
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise TrackingError(f"tracking.uri {folder}: not a writable folder ({err.strerror})") from None


def open_tracker(tracking, run_name: str | None = None, run_id: str | None = None, resume: bool = True,
                 tags: dict[str, str] | None = None, uri: str | None = None):
    """A new run, or ``run_id`` reopened, in the store ``tracking`` (a TrackingSpec) names;
    ``uri`` overrides ``tracking.uri``. MLflow is imported only by its own backend."""
    uri = uri or tracking.uri
    if tracking.backend == "jsonl":
        tracker = JsonlTracker(resolve_uri(uri, "jsonl"), tracking.experiment, run_name, run_id, resume, tags)
    else:
        tracker = Tracker(uri, tracking.experiment, run_name, run_id, resume, tags)
    if not tracking.wandb:
        return tracker
    from epo_cli.wandb_mirror import WandbMirror

    return WandbMirror(tracker, tracking, tags)


# ------------------------------------------------------------- run lookup
def find_run(client, experiment_id: str, id_or_name: str):
    """A run by id, else the newest run of that name."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(id_or_name)
    except MlflowException:
        found = client.search_runs([experiment_id], f"attributes.run_name = '{id_or_name}'", order_by=["attributes.start_time DESC"])
        if not found:
            raise LookupError(f"--run {id_or_name!r}: no run with that id or name in this experiment") from None
        return found[0]


def latest_runs(client, experiment_id: str, where: str) -> tuple[list, str]:
    """The newest RL run (SFT runs have no RL metrics) or, when it is an ablation's, every
    arm of that ablation; and a line saying which."""
    recent = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=50)
    found = [run for run in recent if run.data.tags.get("epo.kind") != "sft"]
    if not found:
        raise LookupError(f"no RL runs in {where}: train one with `epo train`, or pass --run RUN_ID")
    newest = found[0]
    tags = newest.data.tags
    parent_id = tags.get("mlflow.parentRunId") or (newest.info.run_id if "epo.ablation.key" in tags else None)
    if parent_id is None:
        return [newest], f"plotting the latest run, {newest.info.run_name} ({newest.info.run_id})"
    arms = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", order_by=["attributes.start_time ASC"])
    if not arms:
        raise LookupError(f"the latest run is the ablation {newest.info.run_name} ({parent_id}) with no arms yet; pass --run RUN_ID")
    parent_name = client.get_run(parent_id).info.run_name
    return arms, f"plotting the {len(arms)} arms of the latest ablation, {parent_name} ({parent_id})"


def run_episodes(target: str | None, step: int | None, split: str | None, experiment: str, tracking_uri: str | None):
    """(run, file, text, note) of a run's episode file: of ``split`` (None: training) at
    ``step``, of ``target`` (a run id or name) or else of the latest run with episodes (the
    note says which; else None)."""
    from epo_cli.transcripts import ARTIFACT_DIR, run_episode_file, transcript_files

    client, experiment_id = connect(tracking_uri, experiment)
    note = None
    if target is not None:
        run = find_run(client, experiment_id, target)
    else:
        runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=50)
        run = next((r for r in runs if transcript_files([a.path for a in client.list_artifacts(r.info.run_id, ARTIFACT_DIR)])), None)
        if run is None:
            raise LookupError(f"no run with episodes in experiment {experiment!r} of {resolve_uri(tracking_uri)}: train one with `epo train`")
        note = f"showing the latest run with episodes, {run.info.run_name} ({run.info.run_id})"
    chosen, text = run_episode_file(client, run.info.run_id, step, split)
    return run, chosen, text, note
