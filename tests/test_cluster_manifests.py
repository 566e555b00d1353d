"""The cluster files hold what the tools that consume them accept, and agree with the repository.

* KubeRay manifests validate against the operator's real CRD schemas (../shared/kuberay-crds), made
  strict the way the API server's strict field validation is (an unknown field is an error), so a
  misspelt field fails here instead of being pruned silently on a user's cluster.
* The launcher YAML passes Ray's own config validation (what `ray up` runs before any cloud call).
* Images, entrypoints, paths and versions named in them exist in the repo and agree with pyproject.toml.
* jobs/ftcot_job.py: the checks a cluster job makes before any work (node-local outputs, ../shared).
Fast (no Ray started); the real clusters are in tests/test_cluster_runs.py.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from ftcot_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SHARED = Path(os.environ.get("FTCOT_SHARED", REPO.parent / "shared"))
CRDS = SHARED / "kuberay-crds"
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
MANIFESTS = {"RayCluster": "kuberay-raycluster.yaml", "RayJob": "kuberay-rayjob.yaml",
             "RayService": "kuberay-rayservice.yaml"}
IMAGE_IN_DOCKERFILE_ROOT = "/home/ray/ftcot-ray"  # WORKDIR of cluster/Dockerfile
SECRETISH = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$")  # env var names that hold credentials


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def constraints() -> dict[str, str]:
    out = {}
    for line in (CLUSTER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canon(name)] = version
    return out


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ray_pin() -> str:
    return constraints()["ray"]


def manifest(kind: str) -> dict:
    return yaml.safe_load((CLUSTER / MANIFESTS[kind]).read_text())


# --------------------------------------------------------------------------- CRD schemas


def strict(schema):
    """The CRD schema with `additionalProperties: false` wherever Kubernetes would reject unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators():
    if not CRDS.is_dir():
        pytest.skip(f"needs the KubeRay CRDs in {CRDS} (../shared beside the repo); not present here")
    import jsonschema

    out = {}
    for kind, plural in KINDS.items():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 3 MB of schema: the C parser is 10x faster
        crd = yaml.load((CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[kind] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return out


def errors(validators, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_kuberay_manifest_validates_against_the_operators_crd(validators, kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert errors(validators, doc) == []


@pytest.mark.parametrize("kind,path,typo", [
    ("RayCluster", ["spec"], "enableInTreeAutoscalling"),
    ("RayCluster", ["spec", "headGroupSpec"], "rayStartParms"),
    ("RayJob", ["spec"], "shutdownAfterJobFinish"),
    ("RayJob", ["spec", "rayClusterSpec", "workerGroupSpecs", 0], "minReplica"),
    ("RayJob", ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0], "imagePullPolcy"),
    ("RayService", ["spec"], "serveConfigv2"),
])
def test_a_misspelt_field_fails_validation(validators, kind, path, typo):
    doc = copy.deepcopy(manifest(kind))
    node = doc
    for p in path:
        node = node[p]
    node[typo] = node.get(typo, "x")
    problems = errors(validators, doc)
    assert problems and any(typo in p for p in problems), problems


def test_a_wrong_type_fails_validation(validators):
    doc = copy.deepcopy(manifest("RayCluster"))
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert errors(validators, doc)


# --------------------------------------------------------------------------- what the manifests say


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, g["template"]["spec"]) for name, g in groups]


def ray_cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_manifest_autoscales_a_gpu_group_from_zero_and_agrees_with_pyproject(kind):
    from packaging.specifiers import SpecifierSet

    doc = manifest(kind)
    rc = ray_cluster_spec(doc)
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["rayVersion"] == ray_pin()
    ray_spec = next(d for d in pyproject()["project"]["dependencies"] if canon(re.split(r"[\[<>=!~ ]", d)[0]) == "ray")
    assert ray_pin() in SpecifierSet(ray_spec.split("]")[-1])
    gpu = [g for g in rc["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and gpu[0]["minReplicas"] == 0 and gpu[0]["replicas"] == 0 and gpu[0]["maxReplicas"] >= 1
    limits = gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == "1"
    assert rc["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"  # GPU work goes to the group


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_images_are_the_ones_cluster_dockerfile_builds(kind):
    version = pyproject()["project"]["version"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for group, pod in pod_specs(manifest(kind)):
        for c in pod["containers"]:
            repo, _, tag = c["image"].rpartition(":")
            assert tag in (version, f"{version}-gpu"), (group, c["image"])
            assert (tag.endswith("-gpu")) == (group == "gpu"), (group, c["image"])
            assert f"-t {c['image']} " in dockerfile or f"-t {c['image']}\n" in dockerfile, \
                f"{c['image']} is not a tag cluster/Dockerfile's build lines produce"


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_every_pod_mounts_the_shared_claim_and_no_secret_is_a_literal(kind):
    pvc = yaml.safe_load((CLUSTER / "kuberay-storage.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for group, pod in pod_specs(manifest(kind)):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: claims[m["name"]] for m in c["volumeMounts"]}
            assert mounts.get("/mnt/shared") == pvc["metadata"]["name"], (group, mounts)
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_rayjob_runs_the_job_entrypoint_against_a_real_teacher_with_the_key_from_a_secret(tmp_path, monkeypatch):
    from ftcot_ray.cli import COMMANDS, _parser

    doc = manifest("RayJob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(IMAGE_IN_DOCKERFILE_ROOT + "/")
    assert (REPO / Path(argv[1]).relative_to(IMAGE_IN_DOCKERFILE_ROOT)).is_file()  # what the image copies
    name, rest = argv[2], argv[3:]
    args = _parser(name, COMMANDS[name]).parse_args(rest)
    cfg = load_config(args.config, args.overrides)
    assert cfg.teacher.base_url and cfg.teacher.base_url.startswith("https://")  # a real endpoint, no teacher-sim
    head = pod_specs(doc)[0][1]["containers"][0]
    env = {e["name"]: e for e in head.get("env", [])}
    ref = env[cfg.teacher.api_key_env]["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True  # this job needs the key: no key, no pod
    # The job's own pre-flight accepts it on the cluster layout: outputs shared, ../shared mapped.
    job = load_job_module()
    monkeypatch.setenv("FTCOT_SHARED", str(tmp_path))
    for value in job.shared_refs(cfg.model_dump(mode="json")).values():
        (tmp_path / str(value).removeprefix("../shared/")).mkdir(parents=True, exist_ok=True)
    ready = job.on_cluster(cfg)
    assert ready.data.source == str(tmp_path / "datasets/zero_shot_cot/dataset")
    assert ready.run_dir.startswith("/mnt/shared/")
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]  # a mapping, nothing secret in it
    assert not any(SECRETISH.search(k) for k in yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"])


def test_rayservice_serves_the_serve_app_with_a_config_the_cli_accepts():
    doc = manifest("RayService")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "ftcot_ray.serve.app:build_app"
    assert set(app["args"]) == {"config", "overrides"}
    cfg = load_config(app["args"]["config"], app["args"]["overrides"])
    # Serve imports the app without jobs/ftcot_job.py: every path must already be absolute.
    assert Path(cfg.run_dir).is_absolute() and Path(cfg.data.source).is_absolute()
    shared = CLUSTER / "serve_config.yaml"
    if shared.is_file():  # the same application for `serve deploy` (written with the serve stage)
        paths = {a.get("import_path") for a in yaml.safe_load(shared.read_text()).get("applications", [])}
        assert app["import_path"] in paths


def test_the_serve_app_the_rayservice_names_is_importable():
    if importlib.util.find_spec("ftcot_ray.serve.app") is None:
        pytest.skip("ftcot_ray/serve/app.py is not built yet (the serve stage is in progress)")
    module, _, attr = yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])["applications"][0][
        "import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


# --------------------------------------------------------------------------- launcher YAML, Dockerfile, pins


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-autoscaler.yaml").read_text())


def test_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = launcher()
    validate_config(raw)
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` validates, before any cloud call


def test_launcher_yaml_with_a_misspelt_key_fails_rays_validation():
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = launcher()
    bad["idle_timout_minutes"] = bad.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        validate_config(bad)
    bad = launcher()
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(bad)


def test_launcher_scales_gpu_workers_from_zero_mounts_shared_storage_and_installs_the_pins():
    c = launcher()
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1
    pin = ray_pin()
    images = [c["docker"]["image"], gpu["docker"]["worker_image"]]
    assert images == [f"rayproject/ray:{pin}-py311", f"rayproject/ray:{pin}-py311-gpu"]
    assert c["file_mounts"] == {"~/ftcot-ray": "."}
    assert any("/mnt/shared" in cmd and "mount" in cmd for cmd in c["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in c["docker"]["run_options"]
    assert "--env FTCOT_SHARED=/mnt/shared" in c["docker"]["run_options"]
    torch = constraints()["torch"]
    for cmds in (c["head_setup_commands"], gpu["worker_setup_commands"]):
        text = " ".join(cmds)
        assert f"torch=={torch}" in text and "-c ~/ftcot-ray/cluster/constraints.txt ~/ftcot-ray" in text
    start = " ".join(c["head_start_ray_commands"])
    assert "OPENAI_API_KEY=\"$(" in start  # read at start from a secret store, not written here
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    args, steps = {}, []
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
        steps.append((op, re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)))
    return args, steps


def test_dockerfile_builds_from_the_pinned_ray_image_and_copies_paths_that_exist():
    args, steps = dockerfile()
    froms = [rest for op, rest in steps if op == "FROM"]
    assert froms == [f"rayproject/ray:{ray_pin()}-py311"]
    workdir = [rest for op, rest in steps if op == "WORKDIR"]
    assert workdir == [IMAGE_IN_DOCKERFILE_ROOT]
    copies = [shlex.split(rest) for op, rest in steps if op == "COPY"]
    assert copies
    copied = set()
    for parts in copies:
        srcs = [p for p in parts[:-1] if not p.startswith("--")]
        for src in srcs:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            copied.add(src)
    assert {"pyproject.toml", "README.md", "ftcot_ray", "jobs", "cluster/constraints.txt"} <= copied
    run = " ".join(rest for op, rest in steps if op == "RUN")
    assert f"torch=={constraints()['torch']}" in run and "-c cluster/constraints.txt ." in run
    assert f"ray.__version__ == '{ray_pin()}'" in run


def test_constraints_pin_every_dependency_inside_pyprojects_ranges():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = constraints()
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canon(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no pin in cluster/constraints.txt"
        assert Version(pins[name]) in req.specifier, f"{name}=={pins[name]} is outside {req.specifier}"
    import ray

    assert ray.__version__ == pins["ray"]  # the version this checkout is tested with
    readme = (REPO / "README.md").read_text()
    assert f"pip install torch=={pins['torch']}" in readme


def test_runtime_env_is_one_ray_accepts_and_holds_no_secret():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert "working_dir" not in env  # given on the command line (--working-dir .)
    assert not any(SECRETISH.search(k) for k in env.get("env_vars", {}))


# --------------------------------------------------------------------------- jobs/ftcot_job.py


def load_job_module():
    spec = importlib.util.spec_from_file_location("ftcot_job", REPO / "jobs" / "ftcot_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def job(tmp_path, monkeypatch):
    """The entrypoint's checks, run from a folder shaped like a job's working dir (nothing beside it)."""
    workdir = tmp_path / "working_dir_files" / "_ray_pkg_0123"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("FTCOT_SHARED", raising=False)
    return load_job_module()


def test_job_refuses_a_relative_run_dir_naming_the_key_and_where_it_would_land(job):
    from ftcot_ray.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        job.on_cluster(load_config("quickstart"))
    msg = str(e.value)
    assert "run_dir=runs/quickstart is relative" in msg and "_ray_pkg_0123" in msg and "/mnt/shared" in msg
    with pytest.raises(ConfigError, match="teacher.cache_dir=cache is relative"):
        job.on_cluster(load_config("quickstart", ["run_dir=/tmp/x", "teacher.cache_dir=cache"]))
    cfg = load_config("quickstart", ["run_dir=/tmp/x"])
    assert job.on_cluster(cfg) == cfg  # nothing to map, nothing refused


def test_job_without_ftcot_shared_says_which_keys_need_it(job):
    from ftcot_ray.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        job.on_cluster(load_config("replay/multiarith", ["run_dir=/tmp/x"]))
    msg = str(e.value)
    assert "data.source=../shared/datasets/zero_shot_cot/dataset" in msg
    assert "teacher.sim.replay_path=../shared/datasets/reasoning-teacher/" in msg
    assert "FTCOT_SHARED" in msg and "_ray_pkg_0123" in msg


def test_job_maps_shared_paths_to_ftcot_shared_and_names_what_is_missing_there(job, tmp_path, monkeypatch):
    from ftcot_ray.errors import ConfigError

    root = tmp_path / "nfs"
    (root / "datasets" / "zero_shot_cot" / "dataset").mkdir(parents=True)
    monkeypatch.setenv("FTCOT_SHARED", str(root))
    with pytest.raises(ConfigError) as e:  # the replay file is not there
        job.on_cluster(load_config("replay/multiarith", ["run_dir=/tmp/x"]))
    msg = str(e.value)
    assert "teacher.sim.replay_path: " + str(root / "datasets/reasoning-teacher") in msg and "does not exist" in msg
    assert "data.source" not in msg  # that one is there
    cfg = job.on_cluster(load_config("paper/multiarith-gpt2-large", ["run_dir=/tmp/x"]))
    assert cfg.data.source == str(root / "datasets" / "zero_shot_cot" / "dataset")


def test_job_entrypoint_stops_the_cli_with_one_line_and_exit_2(job, capsys):
    from ftcot_ray.cli import main

    assert main(["data", "--config", "quickstart"], prepare=job.on_cluster) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftcot data: error: this config cannot run as a cluster job:")
    assert "Traceback" not in err


@pytest.mark.shared
def test_job_entrypoint_runs_a_replay_preset_with_ftcot_shared(job, tmp_path, monkeypatch, shared_datasets, capsys):
    """The replay preset reads ../shared/...: through the entrypoint's hook it resolves via FTCOT_SHARED."""
    from ftcot_ray.cli import main

    monkeypatch.setenv("FTCOT_SHARED", str(shared_datasets.parent))
    assert main(["data", "--config", "replay/multiarith", f"run_dir={tmp_path / 'run'}"], prepare=job.on_cluster) == 0
    captured = capsys.readouterr()
    assert f"data.source -> {shared_datasets}/zero_shot_cot/dataset" in captured.err
    assert '"n": 600' in captured.out

