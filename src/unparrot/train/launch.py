"""Training in processes of its own: `launch(config)` starts one, `launch_all` keeps N running (one model per
process, so two models train in parallel on two cores), `run_distributed` runs one model on N processes
under torchrun.

A launched process is `python -m unparrot.train.launch CONFIG.json`: the parent validates the config and
writes it as JSON (TrainConfig's own fields), the child trains it with `train()`, so a launched run is the
run `train(config)` would make in the calling process, with no command line in between.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .trainer import TrainConfig


def summary_line(s: dict) -> str:
    """The one line `unparrot train` prints at the end of a run."""
    return (
        f"train: {s['steps']} steps, {s['samples_seen']} samples seen, final loss {s['loss']:.4f}, "
        f"{s['samples_per_s']:.0f} samples/s, data wait {100 * s['data_wait']:.1f}% -> {s['checkpoint']}"
    )


def _config_file(config: TrainConfig) -> Path:
    """The validated config as a temporary JSON file for the child (removed when the parent has waited)."""
    fd, path = tempfile.mkstemp(prefix="unparrot-train-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(config.validate()), f)
    return Path(path)


@dataclasses.dataclass
class Launched:
    """A training process started by `launch`: poll it, wait for it, read its summary."""

    name: str
    config: TrainConfig
    process: subprocess.Popen
    log: Path | None
    started: float
    config_file: Path

    def done(self) -> bool:
        return self.process.poll() is not None

    def wait(self, timeout: float | None = None) -> dict:
        """The run's summary.json once the process has ended; a failed run raises with its log's tail."""
        rc = self.process.wait(timeout)
        self.config_file.unlink(missing_ok=True)
        if rc:
            msg = f"training {self.name} failed (exit {rc})"
            if self.log is not None:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                msg += f"; see {self.log}" + (f"\n{tail}" if tail else "")
            raise RuntimeError(msg)
        return self.summary()

    def summary(self) -> dict:
        return json.loads((Path(self.config.out) / "summary.json").read_text())

    @property
    def seconds(self) -> float:
        return time.time() - self.started


def launch(
    config: TrainConfig | dict, log: str | os.PathLike | None = None, name: str | None = None, env: dict | None = None
) -> Launched:
    """Start training `config` in a new Python process and return at once. Its output goes to `log` (a
    file, overwritten) or, without one, to this process's stdout/stderr; `env` adds environment variables."""
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    path = _config_file(config)
    cmd = [sys.executable, "-m", "unparrot.train.launch", str(path)]
    full_env = {**os.environ, **(env or {})}
    if log is None:
        p = subprocess.Popen(cmd, env=full_env)
    else:
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:  # the child holds its own copy of the descriptor
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env)
    return Launched(name or Path(config.out).name, config, p, log, time.time(), path)


def launch_all(
    configs: dict[str, TrainConfig],
    workers: int,
    logs: str | os.PathLike | None = None,
    on_start=None,
    on_done=None,
    env: dict | None = None,
) -> dict[str, dict]:
    """Train every config (name -> config), `workers` processes at a time, and return name -> summary.
    Each run logs to `logs/train-<name>.log`; `on_start(name)` and `on_done(name, summary, seconds)` report
    progress; `env` as in `launch`. The first failed run raises."""
    pending, running, done = list(configs.items()), [], {}
    while pending or running:
        while pending and len(running) < workers:
            name, config = pending.pop(0)
            log = Path(logs) / f"train-{name}.log" if logs is not None else None
            running.append(launch(config, log=log, name=name, env=env))
            if on_start:
                on_start(name)
        time.sleep(1)
        for h in [h for h in running if h.done()]:
            running.remove(h)
            done[h.name] = h.wait()
            if on_done:
                on_done(h.name, done[h.name], h.seconds)
    return done


def run_distributed(config: TrainConfig, nproc: int) -> int:
    """Train `config` on `nproc` processes (torch.distributed.run, standalone) and return their exit
    status; `train()` in each reads its rank from torchrun's environment."""
    path = _config_file(config)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "unparrot.train.launch",
        str(path),
    ]
    try:
        return subprocess.call(cmd)
    finally:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """The child: train the config in the JSON file; the main process prints the summary line."""
    from .trainer import train

    (path,) = sys.argv[1:] if argv is None else argv
    s = train(TrainConfig.from_dict(json.loads(Path(path).read_text())))
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_line(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
