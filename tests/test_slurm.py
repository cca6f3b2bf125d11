"""slurm/train.sh on a real one-node Slurm cluster: DDP on CPU, SIGUSR1 preemption, requeue, resume.

The cluster comes from slurm/local-cluster.sh (installs Slurm with apt-get when missing, needs
root). The job runs the real `s2f fit --config configs/demo.yaml` on shards the test builds; on
rank 0 it prints lines matching STEP_RE after each step and RESUME_RE on a resumed start.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local-cluster.sh"
TRAIN_SH = REPO / "slurm" / "train.sh"

STEP_RE = re.compile(r"\bstep (\d+)\s*$", re.MULTILINE)
RESUME_RE = re.compile(r"resumed from (\S+) at step (\d+)")
START_RE = re.compile(r"^train\.sh: job \d+ start (\d+)", re.MULTILINE)

SIGNAL_AT_STEP = 12  # after the periodic checkpoint at step 10, well before the one at 20
MAX_STEPS = 30
TIMEOUT_S = 420  # the whole submit-preempt-requeue-finish cycle; ~1.5 min idle, ~3 min loaded


@dataclass(frozen=True)
class Training:
    """What train.sh runs (S2F_CMD) and with which config and extra fit arguments."""

    cmd: list[str]
    config: Callable[[Path], Path]
    extra_args: list[str] = field(default_factory=list)


def demo_shards(folder: Path) -> list[str]:
    """Shards and a teacher head for configs/demo.yaml; -> the fit arguments that point at them."""
    from s2f.teacher import TeacherHead
    from shards.schema import TEACHER_HEAD
    from tests.shard_factory import make_shards, round_robin_assignment

    root = make_shards(folder / "shards", speakers=12, clips_per_speaker=8, feature_dim=128,
                       samples_per_shard=8, assignment=round_robin_assignment(12))
    features = torch.rand(24, 128)
    TeacherHead.fit(features, torch.arange(24) % 6).save(root / TEACHER_HEAD)
    return [f"--data.root={root}", f"--model.teacher={root / TEACHER_HEAD}", "--model.num_classes=6",
            "--data.batch_size=8", "--model.train_seconds=1.0", f"--trainer.max_steps={MAX_STEPS}",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--checkpoint.every_n_train_steps=10"]


def demo_config(folder: Path) -> Path:
    return REPO / "configs" / "demo.yaml"


REAL = Training([sys.executable, "-m", "s2f", "fit"], demo_config)
TRAININGS = [pytest.param(REAL, id="s2f-fit-demo")]


def slurm_env(conf: Path) -> dict[str, str]:
    """This process's environment pointed at the local cluster, without an enclosing job's vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    return env


def cluster_dir() -> Path:
    return Path(os.environ.get("S2F_SLURM_DIR", "/tmp/s2f-slurm"))


def run_cluster(command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), command], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A running local cluster; started (and later stopped) here unless one was already up."""
    already_up = run_cluster("status", timeout=60).returncode == 0
    if not already_up:
        if os.geteuid() != 0:
            pytest.skip("starting a local Slurm cluster needs root (slurmd, apt-get); none is running")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("Slurm is not installed and there is no apt-get to install it")
        started = run_cluster("start")
        if started.returncode != 0:
            pytest.fail(f"slurm/local-cluster.sh start failed:\n{started.stdout}\n{started.stderr}")
    try:
        yield slurm_env(cluster_dir() / "slurm.conf")
    finally:
        if not already_up:
            stopped = run_cluster("stop", timeout=120)
            assert stopped.returncode == 0, stopped.stderr


def job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id],
        capture_output=True, text=True, env=env, check=True, timeout=30,
    ).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(what: str, check: Callable[[], bool], log: Path, deadline: float) -> None:
    """Poll check() until it holds or time.monotonic() passes deadline (then fail, with the log)."""
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    text = log.read_text() if log.exists() else "(no log yet)"
    pytest.fail(f"timed out after {TIMEOUT_S} s in all, waiting for {what}; job log:\n{text[-5000:]}")


def last_step(log: Path) -> int:
    steps = STEP_RE.findall(log.read_text()) if log.exists() else []
    return int(steps[-1]) if steps else -1


def ended(job_id: str, env: dict[str, str]) -> bool:
    state = job_fields(job_id, env)["JobState"]
    return state not in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("training", TRAININGS)
def test_preempted_job_requeues_and_resumes(
    training: Training, cluster: dict[str, str], tmp_path: Path
) -> None:
    config = training.config(tmp_path)
    extra_args = training.extra_args + (demo_shards(tmp_path) if training is REAL else [])
    log = tmp_path / "job.out"
    env = cluster | {"S2F_CMD": " ".join(training.cmd)}
    submit = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
         str(TRAIN_SH), str(config), *extra_args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    run_dir = tmp_path / "runs" / f"{config.stem}-{job_id}"

    deadline = time.monotonic() + TIMEOUT_S
    try:
        reached = lambda: last_step(log) >= SIGNAL_AT_STEP or ended(job_id, env)  # noqa: E731
        wait_for(f"step {SIGNAL_AT_STEP}", reached, log, deadline)
        assert not ended(job_id, env), f"job ended before it could be preempted:\n{log.read_text()}"
        # Default scancel signals every step's tasks (the python processes srun launched), not
        # the batch shell; that is what Slurm's --signal=USR1@N does before the time limit.
        subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=30)
        wait_for("the job to end", lambda: ended(job_id, env), log, deadline)
    finally:
        # Leaves nothing running on failure; on success the job is over and this is a no-op.
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)

    text = log.read_text()
    fields = job_fields(job_id, env)
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{text}"
    assert fields["ExitCode"] == "0:0", text
    assert fields["Restarts"] == "1", f"expected exactly one requeue: {fields}\n{text}"
    assert START_RE.findall(text) == ["1", "2"], text

    # One save, however many times SIGUSR1 reached a task (the step's and the batch shell's).
    saved = list((run_dir / "checkpoints").glob("requeue-step*.ckpt"))
    assert len(saved) == 1, f"expected one requeue checkpoint in {run_dir}: {sorted(run_dir.rglob('*'))}"
    saved_step = torch.load(saved[0], map_location="cpu", weights_only=True)["global_step"]
    assert saved_step >= SIGNAL_AT_STEP and f"preempted at step {saved_step}" in text, text
    resumes = RESUME_RE.findall(text)
    assert len(resumes) == 1, text
    # The restart takes the newest checkpoint of the run: the requeue one (step 10's is older).
    assert resumes[0] == (str(saved[0]), str(saved_step)), text
    assert last_step(log) == MAX_STEPS, text
    if training is REAL:  # one W&B run across the requeue: the id is kept in the run directory
        run_id = (run_dir / "wandb_id").read_text().strip()
        runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs


def test_train_sh_refuses_to_run_outside_a_job() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(TRAIN_SH), "configs/demo.yaml"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "not inside a Slurm job" in result.stderr


@pytest.mark.parametrize("script", ["train.sh", "shards.sh", "local-cluster.sh"])
def test_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(REPO / "slurm" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_shards_array_then_dependent_merge(cluster: dict[str, str], tmp_path: Path) -> None:
    """Each array task gets its own --part of --parts; merge runs once, after all of them."""
    env = cluster | {"S2F_SHARDS_CMD": "echo s2f shards"}
    (tmp_path / "runs" / "slurm").mkdir(parents=True)

    def sbatch(*args: str) -> str:
        out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", *args], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    shards_sh = str(REPO / "slurm" / "shards.sh")
    array_id = sbatch("--array=0-2", shards_sh, "build", "--kind", "videos", "--source", "src", "--out", "out")
    merge_id = sbatch(f"--dependency=afterok:{array_id}", "--output=merge.out", shards_sh, "merge", "out")
    merge_log = tmp_path / "merge.out"
    wait_for("the merge job", lambda: ended(merge_id, env), merge_log, time.monotonic() + 180)

    assert job_fields(merge_id, env)["JobState"] == "COMPLETED", merge_log.read_text()
    for part in range(3):
        text = (tmp_path / "runs" / "slurm" / f"s2f-shards-{array_id}_{part}.out").read_text()
        assert f"build --kind videos --source src --out out --part {part} --parts 3 --workers 1" in text
    assert "s2f shards merge out" in merge_log.read_text()
