"""MLflow tracking: a SQLite store under the epo home by default, metrics in one batch per step."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from epo_cli.paths import epo_home

SQLITE_PREFIX = "sqlite:///"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; raised before any training starts."""


def resolve_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``$EPO_HOME/mlflow.db`` (its folder created)."""
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
