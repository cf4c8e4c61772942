"""The SLURM workflow against a real SLURM on this machine (scripts/slurm/local_cluster.sh: slurmctld + slurmd +
munged, one partition over the local CPUs): a Hydra sweep through hydra-submitit-launcher, two srun tasks as one
DDP run, `scontrol requeue` and `scancel` of a running job, and a time limit that expires mid-run.

Marked `slurm`. Needs root (SLURM's daemons run as root) and a cluster that `local_cluster.sh up` can install
(apt) and start; otherwise every test here skips, naming why. The fixture brings the cluster up if it is not
running and down again afterwards (a cluster that was already up, e.g. by .ci/run, is left up). CPU, tiny model,
OMP_NUM_THREADS=1 everywhere, so that a run under SLURM and a local one compute the same floats. About 2-3
minutes on 2 cores, most of it the 1-minute time limit and SLURM's fixed delays (it checks time limits every
30 s; a requeued job waits ~6 s before it starts again). Where a test decides a run's end only once the run has
stopped, the part after the resume is 10 steps on any machine.
"""
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vsa_train.metrics import read_metrics
from vsa_train.checkpoint import verify
from vsa_train.rundir import LOCK, RunDir

# One xdist worker runs them all, one after another: the local cluster has one CPU per core, the two-task job
# takes both, and each test's waits count on its jobs starting when submitted, not queued behind another test's.
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm" / "local_cluster.sh"
# tests/test_lifecycle.py's TINY (64 tokens, steps of milliseconds), without evaluations after step 0
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=4",
        "train.eval_timesteps=2", "train.log_every=1", "train.eval_every=1000000", "logger=none"]
NO_CKPT = "train.ckpt_every=1000000"  # checkpoints only where a run stops (signal) or ends
# The end of a run that the test decides once the run has stopped (so that the part after a resume is short whatever
# this machine's speed): train.max_steps from the environment, which a file sets at the start of each allocation
# (_end_from_file) or the test sets for a local run.
MAX_STEPS_FROM_ENV = "train.max_steps='${oc.decode:${oc.env:VSA_TEST_MAX_STEPS}}'"
UNBOUNDED = "1000000000"
# Job names carry this pytest process's id: a test cancels its own jobs when it ends, and the fixture cancels those
# of sessions that are gone. Several sessions (several developers' pytest runs) can share one local cluster.
PREFIX = f"vsa_test_{os.getpid()}_"


# ------------------------------------------------------------------------------------------------ the cluster

@dataclass
class Cluster:
    env: dict
    partition: str
    cpus: int
    drivers: list = field(default_factory=list)

    def run(self, *cmd, check=True) -> str:
        proc = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))}: status {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def jobs(self, name: str) -> list[str]:
        """Ids of this name's jobs that SLURM still lists as pending or running (one per array element)."""
        return self.run("squeue", "-h", "--name", name, "-t", "PD,R,CG,S,RQ,RS,RH", "-o", "%A").split()

    def state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False)
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "gone")

    def cancel(self, mine=True) -> None:
        """Cancels this session's jobs (mine) or those of test sessions whose process is gone."""
        for name in set(self.run("squeue", "-h", "-o", "%j").split()):
            if name.startswith(PREFIX) if mine else (name.startswith("vsa_test_") and not _alive(name)):
                self.run("scancel", "--name", name, check=False)


def _alive(job_name: str) -> bool:
    pid = job_name.split("_")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@pytest.fixture(scope="module")
def cluster():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root: the local SLURM's daemons run as root (scripts/slurm/local_cluster.sh up)")
    if shutil.which("bash") is None:
        pytest.skip("needs bash for scripts/slurm/local_cluster.sh")
    export = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    conf = Path(export.strip().split("=", 1)[1])
    sessions = conf.parents[1] / "test_sessions"  # who is using the cluster
    sessions.mkdir(parents=True, exist_ok=True)
    mine = sessions / str(os.getpid())
    mine.touch()  # before `up`: a session that ends while this one starts sees it and leaves the cluster up
    try:
        up = _up()
        env = dict(os.environ, SLURM_CONF=str(conf), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[key]  # pytest itself running inside a SLURM job: those would describe the outer allocation
        partition, cpus = subprocess.run(["sinfo", "-h", "-o", "%P %c"], env=env, capture_output=True, text=True,
                                         check=True).stdout.split()[:2]
        found = Cluster(env, partition.rstrip("*"), int(cpus))
        found.cancel(mine=False)  # left over by an interrupted earlier run of these tests
        yield found
    finally:
        mine.unlink(missing_ok=True)
    others = [p for p in sessions.iterdir() if p.name.isdigit() and _alive(f"vsa_test_{p.name}_")]
    if "already running" not in up.stdout and not others:  # started here, and nobody else's tests use it
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)


def _up() -> subprocess.CompletedProcess:
    """`local_cluster.sh up` (safe beside another session's: it waits for that one's lock); skips if it fails."""
    try:
        up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("no local SLURM: `scripts/slurm/local_cluster.sh up` took over 15 minutes")
    if up.returncode != 0:
        pytest.skip(f"no local SLURM: `scripts/slurm/local_cluster.sh up` failed (status {up.returncode}): "
                    f"{(up.stdout + up.stderr).strip()[-1500:]}")
    return up


@pytest.fixture
def slurm(cluster):
    """The cluster; at the end of the test its jobs are cancelled and its drivers killed (a failure leaves none)."""
    cluster.drivers = []
    yield cluster
    for proc in cluster.drivers:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    cluster.cancel()


# -------------------------------------------------------------------------------------------------- helpers

def _multirun(slurm: Cluster, sweep: Path, name: str, *overrides, tasks=1, timeout_min=5) -> subprocess.Popen:
    """`python train.py -m hydra/launcher=slurm ...` in the background (it waits for its jobs); output: driver.log."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm",
           f"hydra.launcher.partition={slurm.partition}", "hydra.launcher.gpus_per_node=0",
           f"hydra.launcher.tasks_per_node={tasks}", "hydra.launcher.cpus_per_task=1",
           f"hydra.launcher.timeout_min={timeout_min}", f"hydra.launcher.name={PREFIX}{name}",
           f"hydra.sweep.dir={sweep}", *TINY, *overrides]
    sweep.mkdir(parents=True)
    with open(sweep.parent / f"{name}_driver.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=sweep.parent, env=slurm.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    slurm.drivers.append(proc)
    return proc


def _end_from_file(end: Path) -> list[str]:
    """Overrides for a sweep whose train.max_steps is read from the file `end` at the start of every allocation
    (the launcher's `setup` lines run in the job script, before the task starts); the file starts unbounded."""
    end.write_text(UNBOUNDED)
    return [f'hydra.launcher.setup=["export VSA_TEST_MAX_STEPS=$(cat {end})"]', MAX_STEPS_FROM_ENV]


def _local(slurm: Cluster, run_dir: Path, *overrides, env: dict | None = None) -> subprocess.Popen:
    """The same training locally (no SLURM), with the same thread count; output: <run_dir>.log."""
    env = {k: v for k, v in slurm.env.items() if k != "SLURM_CONF"} | (env or {})
    with open(f"{run_dir}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}",
                                 *overrides], cwd=run_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    slurm.drivers.append(proc)  # killed at the end of a failed test
    return proc


def _finish(proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{what} did not finish within {timeout} s:\n{_tail(log)}") from None
    assert proc.returncode == 0, f"{what}: status {proc.returncode}\n{_tail(log)}"


def _tail(path: Path, chars=4000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else f"({path} missing)"
    return "\n".join(line for line in text.splitlines() if "sacct" not in line and "accounting" not in line)[-chars:]


def _rows(run: Path) -> list[dict]:
    with warnings.catch_warnings():  # a line being written (torn) is skipped with a warning
        warnings.simplefilter("ignore")
        try:
            return read_metrics(run / "metrics.jsonl")
        except FileNotFoundError:
            return []


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in _rows(run)]


def _losses(run: Path) -> dict:
    return {r["step"]: r["train/loss"] for r in _rows(run) if "train/loss" in r}


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]


def _job_logs(sweep: Path) -> str:
    """Every task's log of every job of a sweep (submitit: .submitit/<job>/<job>_<task>_log.out)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.out")))


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited (status {proc.returncode}) while waiting for {what}:\n"
                                 f"{_tail(log) if log else ''}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s:\n{_tail(log) if log else ''}")


def _run_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


def _one_run(sweep: Path) -> Path | None:
    runs = [p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()] if sweep.is_dir() else []
    return runs[0] if len(runs) == 1 else None


def _assert_continuous(run: Path, last: int) -> None:
    steps = _steps(run)
    assert steps == list(range(last + 1)), f"steps are not 0..{last} once each: {steps[:5]}...{steps[-5:]}"


# ----------------------------------------------------------------------------------------------------- tests

def test_sweep_through_hydra_submitit(slurm, tmp_path):
    """4 sweep points (seed x width) as one SLURM job array; each run directory completes on its own."""
    sweep = tmp_path / "sweep"
    driver = _multirun(slurm, sweep, "sweep", "train.seed=0,1", "model.hidden_size=64,128", "train.max_steps=4")
    _finish(driver, 420, "the sweep", tmp_path / "sweep_driver.log")

    runs = _run_dirs(sweep)
    assert len(runs) == 4, [p.name for p in runs]
    points, jobs = set(), set()
    for run in runs:
        c = OmegaConf.load(run / "config.yaml")
        points.add((c.train.seed, c.model.hidden_size))
        _assert_continuous(run, 4)
        ckpt = RunDir(run).checkpoints.dirs()[-1]
        assert ckpt.name == "step_00000004" and verify(ckpt) is None
        (launch,) = _history(run)
        assert launch["slurm_job"] is not None and launch["processes"] == 1, launch
        jobs.add(launch["slurm_job"])
        assert not (run / LOCK).exists()
    assert points == {(0, 64), (0, 128), (1, 64), (1, 128)}
    assert len(jobs) == 4  # one SLURM job (array element) per point


def test_two_tasks_per_node_are_one_ddp_run(slurm, tmp_path):
    """tasks_per_node=2: srun starts two tasks, train.py turns submitit's environment into RANK/WORLD_SIZE."""
    if slurm.cpus < 2:
        pytest.skip(f"the local partition has {slurm.cpus} CPU; two tasks need 2")
    sweep = tmp_path / "sweep"
    driver = _multirun(slurm, sweep, "ddp", "train.max_steps=4", tasks=2)
    try:
        _finish(driver, 180, "the two-task job", tmp_path / "ddp_driver.log")
    except AssertionError as err:  # which task did not get to the end
        logs = {p.name: p.read_text(errors="replace") for p in sweep.glob(".submitit/*/*_log.out")}
        stuck = [name for name, text in logs.items() if "Exiting after successful completion" not in text]
        raise AssertionError(f"{err}\ntasks that did not finish: {stuck}\n" +
                             "\n".join(f"--- {n}\n{t[-1500:]}" for n, t in logs.items() if n in stuck)) from None
    (run,) = _run_dirs(sweep)
    (launch,) = _history(run)
    assert (launch["processes"], launch["global_batch"]) == (2, 4), launch
    _assert_continuous(run, 4)
    logs = _job_logs(sweep)
    prints = sorted(line.split("fingerprint")[-1] for line in logs.splitlines() if "finished at step 4" in line)
    assert len(prints) == 2 and prints[0] == prints[1], logs[-3000:]  # both ranks, same weights


def test_scontrol_requeue_saves_and_the_job_resumes_exactly(slurm, tmp_path):
    """`scontrol requeue`: SLURM sends SIGTERM (submitit bypasses it), the trainer saves and exits 75, SLURM
    starts the job again and it resumes: steps 0..N once each, the losses of an uninterrupted run. The first
    allocation trains without an end; once it has stopped, the test sets the end N (10 steps on) that the requeued
    allocation reaches."""
    sweep, log = tmp_path / "sweep", tmp_path / "requeue_driver.log"
    driver = _multirun(slurm, sweep, "requeue", *_end_from_file(tmp_path / "max_steps"), NO_CKPT)
    run = _wait(lambda: _one_run(sweep), 240, "run directory", driver, log)
    _wait(lambda: len(_steps(run)) > 5, 240, "step 5", driver, log)
    (job,) = slurm.jobs(f"{PREFIX}requeue")
    slurm.run("scontrol", "requeue", job)
    # the checkpoint of the stop is written before the job ends; SLURM starts it again seconds later
    ckpt = _wait(lambda: (RunDir(run).checkpoints.dirs() or [None])[-1], 120, "checkpoint of the requeue", driver, log)
    n = int(ckpt.name.split("_")[1]) + 10
    (tmp_path / "max_steps").write_text(str(n))
    straight = tmp_path / "straight"
    straight.mkdir()
    reference = _local(slurm, straight, f"train.max_steps={n}", NO_CKPT)
    _finish(driver, 300, "the requeued job", log)
    _finish(reference, 300, "the local reference run", Path(f"{straight}.log"))

    first, second = _history(run)
    assert first["slurm_job"] == second["slurm_job"] == job  # the same job, run again
    stop = int(second["resumed_from"].split("_")[1])
    assert 0 < stop < n and second["resumed_from"] == ckpt.name
    logs = _job_logs(sweep)
    assert "received SIGTERM" in logs and "Bypassing signal SIGTERM" in logs
    assert "Exited with exit code 75" in logs, logs[-3000:]
    _assert_continuous(run, n)
    assert _losses(run) == _losses(straight)
    assert verify(RunDir(run).checkpoints.dirs()[-1]) is None


def test_scancel_leaves_a_consistent_run_that_resumes_locally(slurm, tmp_path):
    """`scancel` of a job started with plain sbatch (no submitit): SIGTERM, the trainer saves and exits 75, the job
    stays cancelled; the run directory verifies, and re-running the same command locally resumes and completes.
    (The job trains without an end, VSA_TEST_MAX_STEPS unbounded; the local re-run's environment ends it 10 steps
    after the step it stopped at.)"""
    run = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run}", MAX_STEPS_FROM_ENV, NO_CKPT]
    command = shlex.join(["exec", sys.executable, str(ROOT / "train.py"), *args])
    log = tmp_path / "job.log"
    job = slurm.run("sbatch", "--parsable", f"--partition={slurm.partition}", f"--job-name={PREFIX}scancel",
                    "--time=5", "--cpus-per-task=1", f"--output={log}", f"--chdir={tmp_path}",
                    f"--export=ALL,VSA_TEST_MAX_STEPS={UNBOUNDED}", f"--wrap={command}").strip().split(";")[0]
    _wait(lambda: len(_steps(run)) > 5, 240, "step 5", log=log)
    slurm.run("scancel", job)
    _wait(lambda: not slurm.jobs(f"{PREFIX}scancel"), 60, "job to leave the queue", log=log)
    assert slurm.state(job) in ("CANCELLED", "gone")
    text = _tail(log, 20000)
    assert "received SIGTERM" in text and "exit code 75" in text, text[-3000:]

    ckpt = RunDir(run).checkpoints.dirs()[-1]
    assert verify(ckpt) is None
    steps = _steps(run)
    assert steps == list(range(len(steps))) and ckpt.name == f"step_{steps[-1]:08d}"  # saved where it stopped
    assert not (run / LOCK).exists()

    n = steps[-1] + 10
    again = _local(slurm, run, MAX_STEPS_FROM_ENV, NO_CKPT, env={"VSA_TEST_MAX_STEPS": str(n)})  # no SLURM
    _finish(again, 300, "the local re-run", Path(f"{run}.log"))
    first, second = _history(run)
    assert first["slurm_job"] == job and second["slurm_job"] is None
    assert second["resumed_from"] == ckpt.name
    _assert_continuous(run, n)
    assert verify(RunDir(run).checkpoints.dirs()[-1]) is None


def test_time_limit_requeues_and_the_run_resumes_exactly(slurm, tmp_path):
    """timeout_min=1: SLURM's USR2 (signal_delay_s before the limit) reaches the trainer, which finishes the step,
    saves and hands the signal to submitit, which requeues the job; the next allocation resumes and completes.

    The run's end is decided by the test, not by this machine's speed: the first allocation trains without an end
    (train.max_steps comes from a file that the launcher's `setup` line reads at the start of every allocation),
    and once USR2 has stopped it the test sets the end the requeued allocation must reach. SLURM checks time
    limits every 30 s and signals at the check before `limit - signal_delay_s`, so with signal_delay_s=10 USR2
    arrives 20-50 s into a 60 s allocation (a larger delay could signal before Python has started)."""
    end = tmp_path / "max_steps"
    sweep, log = tmp_path / "sweep", tmp_path / "timeout_driver.log"
    driver = _multirun(slurm, sweep, "timeout", "hydra.launcher.signal_delay_s=10", "hydra.launcher.max_num_timeout=5",
                       *_end_from_file(end), NO_CKPT, timeout_min=1)
    # The uninterrupted reference trains next to the job from the start, without an end, and is stopped once it has
    # passed N (a reference started after the stop would have to catch up ~1000 steps).
    straight = tmp_path / "straight"
    straight.mkdir()
    reference = _local(slurm, straight, MAX_STEPS_FROM_ENV, NO_CKPT, env={"VSA_TEST_MAX_STEPS": UNBOUNDED})
    run = _wait(lambda: _one_run(sweep), 240, "run directory", driver, log)
    # the checkpoint of the stop is written before submitit requeues; the next allocation starts seconds later
    ckpt = _wait(lambda: (RunDir(run).checkpoints.dirs() or [None])[-1], 300, "checkpoint from SLURM's USR2",
                 driver, log)
    stop = int(ckpt.name.split("_")[1])
    n = stop + 10
    end.write_text(str(n))
    _wait(lambda: max(_steps(straight), default=-1) >= n, 300, f"step {n} of the local reference run", reference,
          Path(f"{straight}.log"))
    os.killpg(reference.pid, signal.SIGKILL)
    reference.wait()
    _finish(driver, 300, "the requeued job", log)

    history = _history(run)
    assert len(history) >= 2 and len({h["slurm_job"] for h in history}) == 1, history  # one job, requeued
    resumed = [h["resumed_from"] for h in history[1:]]
    assert ckpt.name in resumed, history
    script = next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@10" in script and "#SBATCH --requeue" in script and "#SBATCH --time=1" in script
    logs = _job_logs(sweep)
    assert "received SIGUSR2" in logs and "this job is timed-out" in logs and "Requeued job" in logs, logs[-3000:]
    _assert_continuous(run, n)
    assert _losses(run) == {step: loss for step, loss in _losses(straight).items() if step <= n}
    assert verify(RunDir(run).checkpoints.dirs()[-1]) is None


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld and slurmd of a private cluster)."""
    import socket
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port > 65000:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two free ports in a row")


def test_two_ups_at_once_start_one_cluster_with_every_cpu():
    """`local_cluster.sh up` twice at the same time on a fresh VSA_SLURM_HOME (two pytest sessions, or two xdist
    workers, on a machine where the cluster is not up yet): both succeed and there is one of each daemon. A cluster
    of its own (home and ports), so the shared one is left alone. Brought up from an xdist worker, the node still has
    every CPU (the two-task test needs two)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root: the local SLURM's daemons run as root (scripts/slurm/local_cluster.sh up)")
    import tempfile
    home = Path(tempfile.mkdtemp(prefix="vsa_slurm_up_"))  # short: munge's socket path must fit in 108 bytes
    # OMP_NUM_THREADS=1 as in an xdist worker (conftest.py): the node still gets every CPU
    env = dict(os.environ, VSA_SLURM_HOME=str(home), VSA_SLURM_PORT=str(_free_port_pair()), OMP_NUM_THREADS="1")
    try:
        ups = [subprocess.Popen(["bash", str(CLUSTER), "up"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [up.communicate(timeout=900)[0] for up in ups]
        if any("apt-get" in out and up.returncode for up, out in zip(ups, outs)):
            pytest.skip(f"no local SLURM: could not install it: {outs}")
        assert [up.returncode for up in ups] == [0, 0], outs
        assert sum("already running" in out for out in outs) == 1, outs  # the second waited for the first
        for daemon, pattern in (("munged", str(home)), ("slurmctld", f"-f {home}/"), ("slurmd", f"-f {home}/")):
            pids = subprocess.run(["pgrep", "-f", f"^{daemon} .*{pattern}"], capture_output=True,
                                  text=True).stdout.split()
            assert len(pids) == 1, (daemon, pids, outs)
        assert f"CPUs={len(os.sched_getaffinity(0))} " in (home / "etc" / "slurm.conf").read_text()
    finally:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def test_a_grid_runner_takes_its_jobs_time_left(slurm, tmp_path):
    """`python -m vsa_train.grid run ... --time auto` inside a job: the time squeue says the job has left, less the
    runner's own minute (vsa_train/grid/runner.py, job_time_left), here in a job of 3 minutes."""
    log = tmp_path / "job.log"
    command = shlex.join(["exec", sys.executable, "-c",
                          "from vsa_train.grid.runner import job_time_left; print('left', job_time_left())"])
    slurm.run("sbatch", "--parsable", f"--partition={slurm.partition}", f"--job-name={PREFIX}time_left", "--time=3",
              "--cpus-per-task=1", f"--output={log}", f"--chdir={ROOT}", f"--wrap={command}")
    _wait(lambda: not slurm.jobs(f"{PREFIX}time_left"), 120, "the job to end", log=log)
    text = _tail(log)
    assert "left " in text, text
    left = float(text.split("left ")[1].split()[0])
    assert 60 < left <= 120  # 180 s, less the start-up so far, less the runner's 60 s
