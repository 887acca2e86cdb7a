"""Engine batches: in this process, or in worker processes that survive crashes.

A worker that dies, hangs past the step timeout or raises is restarted, and every episode
it held is replayed from its start (reset, then the same actions: the engines are
deterministic) before the pending commands run again. The batch is never short.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Sequence

from epo_cli.envs.base import EnvStep, TaskInstance
from epo_cli.envs.registry import make_engine, title_of


class EnvWorkerError(RuntimeError):
    """A worker kept failing after its restarts."""


class LocalEnvBatch:
    """Engines in this process, one per episode slot, stepped one after another."""

    def __init__(self, env_name: str, options: dict, size: int):
        self.title = title_of(env_name)
        self._make_engine = lambda: make_engine(env_name, options)
        self.engines: list = []
        self.restarts = 0
        self._ensure(size)

    def _ensure(self, size: int) -> None:
        while len(self.engines) < size:
            self.engines.append(self._make_engine())

    def reset(self, tasks: Sequence[TaskInstance]) -> list[EnvStep]:
        self._ensure(len(tasks))
        return [engine.reset(task) for engine, task in zip(self.engines, tasks)]

    def step(self, slots: Sequence[int], actions: Sequence[str]) -> list[EnvStep]:
        return [self.engines[slot].step(action) for slot, action in zip(slots, actions)]

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        self.engines = []


def _worker_main(connection, env_name: str, options: dict) -> None:
    """Serve lists of ("reset", slot, task) / ("step", slot, action) commands."""
    engines: dict[int, object] = {}
    try:
        while True:
            commands = connection.recv()
            if commands is None:
                break
            results = []
            for kind, slot, payload in commands:
                if slot not in engines:
                    engines[slot] = make_engine(env_name, options)
                engine = engines[slot]
                results.append(engine.reset(payload) if kind == "reset" else engine.step(payload))
            connection.send(("ok", results))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:  # reported to the pool, which restarts this worker
        connection.send(("error", traceback.format_exc(limit=3)))
    finally:
        for engine in engines.values():
            try:
                engine.close()
            except Exception:
                pass


class EnvPool:
    """``workers`` processes; episode slot ``s`` lives in worker ``s % workers``."""

    STARTUP_GRACE_S = 120.0  # a new worker imports its engine and starts it (a JVM) first

    def __init__(self, env_name: str, options: dict, workers: int, step_timeout_s: float = 120.0, max_restarts: int = 3):
        self.title = title_of(env_name)
        self.env_name = env_name
        self.options = options
        self.step_timeout_s = step_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self._context = mp.get_context("spawn")
        self._workers: list = [self._spawn() for _ in range(workers)]
        self._fresh = [True] * workers
        self._tasks: dict[int, TaskInstance] = {}
        self._history: dict[int, list[str]] = {}

    def _spawn(self):
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child, self.env_name, self.options), daemon=True)
        process.start()
        child.close()
        return process, parent

    def worker_pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers]

    def reset(self, tasks: Sequence[TaskInstance]) -> list[EnvStep]:
        for slot, task in enumerate(tasks):
            self._tasks[slot] = task
            self._history[slot] = []
        return self._run([("reset", slot, task) for slot, task in enumerate(tasks)])

    def step(self, slots: Sequence[int], actions: Sequence[str]) -> list[EnvStep]:
        results = self._run([("step", slot, action) for slot, action in zip(slots, actions)])
        for slot, action in zip(slots, actions):
            self._history[slot].append(action)
        return results

    def _run(self, commands: list) -> list[EnvStep]:
        n = len(self._workers)
        per_worker: dict[int, list] = {}
        for index, command in enumerate(commands):
            per_worker.setdefault(command[1] % n, []).append((index, command))
        for worker, items in per_worker.items():
            self._send(worker, [c for _, c in items])
        results: list = [None] * len(commands)
        for worker, items in per_worker.items():
            for (index, _), result in zip(items, self._receive(worker, [c for _, c in items])):
                results[index] = result
        return results

    def _send(self, worker: int, commands: list) -> None:
        try:
            self._workers[worker][1].send(commands)
        except (BrokenPipeError, OSError):
            pass  # found dead on receive, then restarted and replayed

    def _receive(self, worker: int, commands: list) -> list[EnvStep]:
        """The results of ``commands``; on a failure, restart the worker, replay its
        episodes, and send the commands again."""
        pending = commands
        for attempt in range(self.max_restarts + 1):
            process, connection = self._workers[worker]
            timeout = self.step_timeout_s * len(pending) + (self.STARTUP_GRACE_S if self._fresh[worker] else 0.0)
            try:
                if connection.poll(timeout):
                    status, payload = connection.recv()
                    if status == "ok":
                        self._fresh[worker] = False
                        return payload[len(pending) - len(commands) :]
                    failure = payload.strip().splitlines()[-1]
                else:
                    failure = f"no answer within {self.step_timeout_s:g} s per command"
            except (EOFError, OSError):
                failure = f"process exited (code {process.exitcode})"
            if attempt == self.max_restarts:
                raise EnvWorkerError(f"{self.title} worker {worker} failed {attempt + 1} times; last: {failure}")
            self._restart(worker)
            pending = self._replay_commands(worker) + commands
            self._send(worker, pending)
        raise AssertionError("unreachable")

    def _replay_commands(self, worker: int) -> list:
        n = len(self._workers)
        replay = []
        for slot, task in self._tasks.items():
            if slot % n == worker:
                replay.append(("reset", slot, task))
                replay.extend(("step", slot, action) for action in self._history[slot])
        return replay

    def _restart(self, worker: int) -> None:
        process, connection = self._workers[worker]
        if process.is_alive():
            process.kill()
        process.join(timeout=10)
        connection.close()
        self._workers[worker] = self._spawn()
        self._fresh[worker] = True
        self.restarts += 1

    def close(self) -> None:
        for process, connection in self._workers:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process, connection in self._workers:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
            connection.close()
        self._workers = []


def make_env_batch(env: str, size: int, options: dict, workers: int = 0, step_timeout_s: float = 120.0):
    """In-process engines (``workers=0``) or a crash-tolerant pool of worker processes."""
    if workers <= 0:
        return LocalEnvBatch(env, options, size)
    return EnvPool(env, options, workers, step_timeout_s)


def env_batch_for(spec, size: int):
    """The engine batch an ``ExperimentSpec`` asks for (engines enumerate their complete
    commands when ``rollout.constrain`` needs them)."""
    options = {**spec.env.engine_options, "valid_actions": spec.rollout.constrain == "admissible"}
    return make_env_batch(spec.env.name, size, options, spec.env.workers, spec.env.step_timeout_s)
