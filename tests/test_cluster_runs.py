"""Real clusters on this machine, driven the way a user drives a cloud one: `ray start`, `ray job submit`.

1. Two nodes (`ray start --head`, then `ray start --address` with its own CPUs): the reduced quickstart
   submitted with `ray job submit` + jobs/ftcot_job.py succeeds, training workers ran on BOTH nodes
   (Ray's state API: the node of every RayTrainWorker actor), the teacher key reached the job from the
   head's environment only and appears in no log, job record or output, a missing key fails the job
   in seconds naming the variable, and a new submission sees the finished run.
2. Autoscaling with Ray's real autoscaler on simulated nodes (the fake multi-node provider Ray's own
   tests use): a worker type that starts at 0 nodes is the only one whose nodes fit the training
   workers; the autoscaler launches nodes for them, the job succeeds, the nodes go after the idle timeout.

Each test starts its own cluster in its own temp dir and ports, and stops ONLY that cluster: `ray stop`
(and `AutoscalingCluster.start/shutdown`, which call `ray stop --force`) would kill every Ray on the
machine, so the processes are found by the temp dir in their command line (plus their descendants).
Slow (minutes on 2 cores): run them one at a time.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from ftcot_ray.artifacts import is_complete, stage_dir
from ftcot_ray.config import load_config
from ftcot_ray.tables import read_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

# The reduced quickstart: one Fine-tune-CoT student (2 training workers, 8 steps), 16 test questions.
REDUCED = [
    "data.train_size=48", "data.test_size=16", "data.difficulty=3",
    "teacher.samples=1", "pipeline.diversity=[1]", "pipeline.methods=[ft_cot]",
    "train.max_steps=8", "train.batch_size=4", "train.num_workers=2", "train.cpus_per_worker=1",
    "train.eval_every_steps=8", "train.val_max_examples=8", "train.val_max_new_tokens=64",
    "eval.max_new_tokens=64", "eval.batch_size=16",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def base_env() -> dict:
    """The environment every process of the cluster starts with: this venv first, no token auth, and
    no RAY_ADDRESS that could point anything at another cluster on the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


class LocalCluster:
    """A Ray cluster of `ray start` processes in its own temp dir and ports; `stop()` ends only them."""

    def __init__(self):
        # Short path: Ray's unix sockets live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="ftcl", dir="/tmp")
        self.ip = node_ip()
        self.port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, num_cpus: int, env: dict, extra: list[str] = ()) -> None:
        args = ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}", *extra]
        try:
            self._ray_start(args, num_cpus, env)
        except AssertionError:  # Ray waits a fixed 30 s for its raylet: on busy shared cores, try once more
            self.stop()
            self.temp_dir = tempfile.mkdtemp(prefix="ftcl", dir="/tmp")
            self._ray_start([a.replace(args[2], f"--temp-dir={self.temp_dir}") for a in args], num_cpus, env)

    def add_node(self, num_cpus: int, env: dict) -> None:
        # Its own temp dir, as a real node has its own disk. Sharing the head's, the second node's
        # runtime-env agent unpacks the job's working dir again into the same folder, deleting it under
        # the running driver (seen: getcwd() ENOENT, then "Intel oneMKL FATAL ERROR: Cannot load
        # libtorch_cpu.so" or a segfault at the driver's first matmul). Inside self.temp_dir, so
        # processes() and stop() still find this node.
        node_dir = tempfile.mkdtemp(prefix="n", dir=self.temp_dir)
        self._ray_start([f"--address={self.ip}:{self.port}", f"--temp-dir={node_dir}"], num_cpus, env)

    def _ray_start(self, args: list[str], num_cpus: int, env: dict) -> None:
        cmd = [str(BIN / "ray"), "start", *args, f"--num-cpus={num_cpus}", "--num-gpus=0",
               "--object-store-memory=200000000", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", "--disable-usage-stats"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its temp dir, and all their descendants."""
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.temp_dir in " ".join(p.info["cmdline"] or []):
                    roots.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found |= {c.pid: c for c in p.children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        left = [p for p in self.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"cluster processes still running: {[p.pid for p in left]}"

    # ------------------------------------------------------------------ jobs

    def submit(self, *args: str, env: dict | None = None) -> str:
        """`ray job submit` exactly as the README says, returning the submission id."""
        sub_id = f"ftcot-{secrets.token_hex(4)}"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", ".",
               "--runtime-env", "jobs/runtime_env.yaml", "--submission-id", sub_id, "--no-wait",
               "--", "python", "jobs/ftcot_job.py", *args]
        out = subprocess.run(cmd, cwd=REPO, env=env or base_env(), capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"ray job submit failed:\n{out.stdout}\n{out.stderr}"
        return sub_id

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def wait(self, sub_id: str, timeout_s: float) -> tuple[str, str]:
        from ray.job_submission import JobStatus

        client, t0 = self.client(), time.time()
        while time.time() - t0 < timeout_s:
            status = client.get_job_status(sub_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return str(status.value), client.get_job_logs(sub_id)
            time.sleep(2)
        client.stop_job(sub_id)
        raise AssertionError(f"job {sub_id} still {status} after {timeout_s}s:\n{client.get_job_logs(sub_id)[-4000:]}")

    # ------------------------------------------------------------------ state

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, limit=1000, raise_on_missing_output=False)

    def train_worker_nodes(self) -> list[str]:
        """The node id of every Ray Train worker actor this cluster ever ran (dead ones included)."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=1000,
                             detail=True, raise_on_missing_output=False)
        return [a.node_id for a in actors]


@pytest.fixture
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def teacher(tmp_path):
    """A teacher-sim on this host's address (not loopback: a real remote endpoint to the client) that
    answers only requests carrying the key from $FTCOT_TEST_TEACHER_KEY (401 otherwise)."""
    key = "sk-ftcot-test-" + secrets.token_hex(16)
    port = free_port()
    env = base_env() | {"FTCOT_TEST_TEACHER_KEY": key}
    log = open(tmp_path / "teacher-sim.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ftcot_ray.cli", "teacher-sim", "--host", node_ip(),
                             "--port", str(port), "--require-key-env", "FTCOT_TEST_TEACHER_KEY"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://{node_ip()}:{port}/v1"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code in (200, 401):
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield {"url": url, "key": key}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:
            pass
    return hits


def test_two_node_job_trains_on_both_nodes_with_the_key_from_the_cluster_environment(cluster, teacher, tmp_path):
    run_dir = tmp_path / "shared" / "runs" / "quickstart"  # "storage every node sees": one machine here
    head_env = base_env() | {"FTCOT_TEST_TEACHER_KEY": teacher["key"]}  # the cluster-level secret, head only
    # One logical CPU per node: the 2 training workers (1 CPU each) cannot both fit on one node.
    cluster.start_head(num_cpus=1, env=head_env)
    cluster.add_node(num_cpus=1, env=base_env())
    nodes = cluster.nodes()
    assert len([n for n in nodes if n.state == "ALIVE"]) == 2
    head_id = next(n.node_id for n in nodes if n.is_head_node)
    worker_id = next(n.node_id for n in nodes if not n.is_head_node)

    overrides = [f"run_dir={run_dir}", *REDUCED, f"teacher.base_url={teacher['url']}",
                 "teacher.api_key_env=FTCOT_TEST_TEACHER_KEY"]
    t0 = time.time()
    sub_id = cluster.submit("run", "--config", "quickstart", *overrides)
    status, logs = cluster.wait(sub_id, timeout_s=900)
    assert status == "SUCCEEDED", logs[-6000:]
    wall = time.time() - t0

    # The outputs: every stage finished, a student, a prediction per test question, the report.
    cfg = load_config("quickstart", overrides)
    for stage in ("data", "teach", "curate", "train", "eval"):
        assert is_complete(stage_dir(cfg, stage)), stage
    assert (stage_dir(cfg, "train") / "student" / "model.safetensors").is_file()
    assert len(read_table(stage_dir(cfg, "eval"), "predictions")) == 16
    assert (run_dir / "report.md").is_file() and "Fine-tune-CoT" in logs  # the table, in the job's output

    # Training workers ran on both nodes (Ray's record of where each RayTrainWorker actor lived).
    train_nodes = cluster.train_worker_nodes()
    assert len(train_nodes) >= 2 and set(train_nodes) == {head_id, worker_id}, (train_nodes, head_id, worker_id)

    # The key reached the driver from the head's environment (the sim answers nothing without it) and
    # is nowhere: not in the job's logs or record (entrypoint, runtime env, metadata), the run folder,
    # or any of Ray's session files (logs, runtime env packages) on this cluster.
    needle = teacher["key"].encode()
    info = cluster.client().get_job_info(sub_id)
    assert teacher["key"] not in logs and teacher["key"] not in json.dumps(info.model_dump(), default=str)
    assert files_containing(run_dir, needle) == []
    assert files_containing(Path(cluster.temp_dir), needle) == []

    # A key that is not set fails the job at once, naming the variable, with no traceback.
    t1 = time.time()
    missing = cluster.submit("run", "--config", "quickstart", f"run_dir={tmp_path / 'shared' / 'runs' / 'nokey'}",
                             *REDUCED, f"teacher.base_url={teacher['url']}", "teacher.api_key_env=FTCOT_NOT_SET_KEY")
    status, logs = cluster.wait(missing, timeout_s=300)
    assert status == "FAILED"
    assert "environment variable FTCOT_NOT_SET_KEY, which is not set" in logs, logs[-3000:]
    assert "Traceback" not in logs and time.time() - t1 < 120

    # A new submission of the same run finds everything done (outputs on shared storage, not in the job's copy).
    plan = cluster.submit("run", "--plan", "--config", "quickstart", *overrides)
    status, logs = cluster.wait(plan, timeout_s=300)
    assert status == "SUCCEEDED", logs[-3000:]
    plan_out, _ = json.JSONDecoder().raw_decode(logs[logs.index("{\n"):])  # the --plan JSON, after any log lines
    stages = plan_out["stages"]
    assert stages and all(s["done"] for s in stages), stages
    print(f"two-node job: {wall:.0f} s wall, train workers on nodes {sorted(set(train_nodes))}")


def fake_cluster_config(cluster: LocalCluster, head_cpus: int, idle_timeout_minutes: float) -> dict:
    """Ray's fake multi-node provider config (its fake_multi_node/example.yaml, which the wheel lacks)."""
    return {
        "cluster_name": "ftcot-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"{cluster.ip}:{cluster.port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            # The only nodes where a 2-CPU training worker fits; none until the autoscaler adds them.
            "trainer": {"resources": {"CPU": 2, "object_store_memory": 200_000_000}, "node_config": {},
                        "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def test_autoscaler_launches_trainer_nodes_from_zero_and_releases_them_when_idle(cluster, tmp_path):
    config = tmp_path / "fake-cluster.json"
    config.write_text(json.dumps(fake_cluster_config(cluster, head_cpus=1, idle_timeout_minutes=0.1)))
    env = base_env() | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cluster.start_head(num_cpus=1, env=env, extra=[f"--autoscaling-config={config}"])
    assert [n.is_head_node for n in cluster.nodes() if n.state == "ALIVE"] == [True]  # the type starts at 0

    seen: dict[str, str] = {}  # node id -> "ALIVE" while seen alive
    stop = threading.Event()

    def watch():
        while not stop.wait(1):
            try:
                for n in cluster.nodes():
                    if not n.is_head_node and n.state == "ALIVE":
                        seen[n.node_id] = n.state
            except Exception:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run_dir = tmp_path / "shared" / "runs" / "autoscale"
    # Training asks for 2 workers x 2 CPUs: only trainer nodes have 2 CPUs (teach and eval fit the head).
    overrides = [f"run_dir={run_dir}", *REDUCED, "train.cpus_per_worker=2"]
    sub_id = cluster.submit("run", "--config", "quickstart", *overrides)
    try:
        status, logs = cluster.wait(sub_id, timeout_s=900)
    finally:
        stop.set()
        watcher.join(5)
    assert status == "SUCCEEDED", logs[-6000:]
    cfg = load_config("quickstart", overrides)
    assert len(read_table(stage_dir(cfg, "eval"), "predictions")) == 16

    launched = set(seen)
    assert len(launched) >= 2, f"the autoscaler launched {len(launched)} trainer node(s)"
    train_nodes = set(cluster.train_worker_nodes())
    assert train_nodes and train_nodes <= launched, (train_nodes, launched)  # the workers ran on launched nodes

    # Idle for 6 s (idle_timeout_minutes=0.1): the autoscaler removes them and the head is alone again.
    deadline = time.time() + 180
    while time.time() < deadline:
        alive = [n for n in cluster.nodes() if n.state == "ALIVE" and not n.is_head_node]
        if not alive:
            break
        time.sleep(2)
    assert not alive, f"trainer nodes still up after the idle timeout: {[n.node_id for n in alive]}"
    monitor = "\n".join(p.read_text(errors="replace") for p in Path(cluster.temp_dir).glob("session_*/logs/monitor.*"))
    assert "Adding 2 node(s) of type trainer" in monitor or "Adding 1 node(s) of type trainer" in monitor
    assert "idle" in monitor.lower()
