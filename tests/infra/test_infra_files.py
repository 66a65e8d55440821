"""What can be checked here of the infra files that start clusters and services elsewhere: they
parse, the Ray launcher config passes Ray's own schema, the KubeRay manifests carry what a run
needs (entrypoint, head and GPU worker groups, MLflow wiring, token auth), and every image or node
installs raypeft with the project's own install commands, read from the Makefile and pyproject."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
IMAGE_REPO_DIR = "/opt/raypeft"  # where infra/Dockerfile puts the repository


# ----------------------------------------------------------------------------- helpers

def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    return docs


def _by_kind(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in _docs(path)}


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\?=\s*(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert m, f"Makefile: no default for {name}"
    return m.group(1).strip()


def _makefile_torch_install() -> str:
    """The Makefile's torch install, in the form `python -m pip install ... $(TORCH) ...`."""
    m = re.search(r"\$\(BIN\)/python (-m pip install [^\n;]*\$\(TORCH\)[^\n;]*?)\s*;", (REPO / "Makefile").read_text())
    assert m, "Makefile: no `$(BIN)/python -m pip install ... $(TORCH)` line"
    return m.group(1)


def _makefile_editable_install() -> str:
    """The Makefile's raypeft install with an extra: `-m pip install -q -e '.[EXTRA]'`."""
    m = re.search(r"\$\(BIN\)/python (-m pip install [^\n]*-e '\.\[)\w+(\]')", (REPO / "Makefile").read_text())
    assert m, "Makefile: no `$(BIN)/python -m pip install ... -e '.[extra]'` line"
    return m.group(1) + "{extra}" + m.group(2)


def _torch_install_with(torch: str, index: str) -> str:
    """The Makefile's torch command with $(TORCH) and $(TORCH_INDEX) replaced by ``torch``/``index``."""
    cmd = _makefile_torch_install()
    cmd = cmd.replace("$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))", f"--index-url {index}")
    return cmd.replace("$(TORCH)", torch)


def _dockerfile() -> tuple[dict[str, str], list[str], list[str]]:
    """(ARG defaults, RUN commands, all instructions), with line continuations joined."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = dict(re.match(r"ARG (\w+)=(\S+)", ln).groups() for ln in lines if re.match(r"ARG \w+=", ln))
    runs = [re.sub(r"\s+", " ", ln[4:]) for ln in lines if ln.startswith("RUN ")]
    return args, runs, lines


def _gpu_extra() -> list[str]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "gpu" in extras, "pyproject.toml: no `gpu` extra"
    return extras["gpu"]


def _pos(commands: list[str], needle: str) -> int:
    hits = [i for i, c in enumerate(commands) if needle in c]
    assert hits, f"not found in commands: {needle!r}\ncommands: {commands}"
    return hits[0]


# ----------------------------------------------------------------------------- every file

def test_every_yaml_parses_and_every_script_passes_bash_n() -> None:
    yamls = sorted(INFRA.rglob("*.yaml"))
    assert {p.relative_to(INFRA).as_posix() for p in yamls} >= {
        "cluster-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/mlflow.yaml",
        "kuberay/storage.yaml"}
    for path in yamls:
        _docs(path)
    scripts = sorted(INFRA.glob("*.sh"))
    assert {p.name for p in scripts} >= {"local-cluster.sh", "mlflow-server.sh"}
    for script in scripts:
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script.name}: {res.stderr}"
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"


# ----------------------------------------------------------------------------- install commands

def test_gpu_extra_is_the_gpu_engine() -> None:
    names = {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower() for req in _gpu_extra()}
    assert {"deepspeed", "bitsandbytes"} <= names


def test_dockerfile_installs_cuda_torch_then_raypeft_gpu_like_the_makefile() -> None:
    args, runs, lines = _dockerfile()
    assert lines[lines.index(next(ln for ln in lines if ln.startswith("FROM ")))] == "FROM ${CUDA_IMAGE}"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "devel" in args["CUDA_IMAGE"], \
        "DeepSpeed builds its ops with nvcc: a CUDA devel image is needed"
    assert args["TORCH"] == _makefile_var("TORCH")
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])

    torch_cmd = "python " + _torch_install_with("${TORCH}", "${TORCH_INDEX}")
    raypeft_cmd = "python " + _makefile_editable_install().format(extra="gpu")
    assert _pos(runs, torch_cmd) < _pos(runs, raypeft_cmd), "torch must be installed before raypeft"
    copy_line = next(ln for ln in lines if ln.startswith("COPY "))
    assert copy_line.endswith(f". {IMAGE_REPO_DIR}")
    assert f"WORKDIR {IMAGE_REPO_DIR}" in lines
    # The image checks its torch is a CUDA build, so a wrong TORCH_INDEX fails the build.
    assert any("torch.version.cuda" in r for r in runs)


def test_image_and_launcher_follow_the_readme_gpu_install() -> None:
    """The README's GPU recipe: CUDA torch from a download.pytorch.org/whl/cuNNN index, then
    `pip install -e '.[gpu]'`. The image and the launcher use that index and that extra."""
    readme = (REPO / "README.md").read_text()
    torch_lines = re.findall(r"pip install torch[^\n]*--index-url (https://download\.pytorch\.org/whl/cu\d+)", readme)
    assert torch_lines, "README.md: no GPU torch install line (`pip install torch --index-url .../cuNNN`)"
    assert re.search(r"pip install -e '\.\[gpu\]'", readme), "README.md: no `pip install -e '.[gpu]'`"
    args, runs, _ = _dockerfile()
    assert args["TORCH_INDEX"] == torch_lines[0]
    cfg = yaml.safe_load((INFRA / "cluster-gpu.yaml").read_text())
    assert any(f"--index-url {torch_lines[0]}" in c for c in cfg["setup_commands"])
    assert any("-e '.[gpu]'" in r for r in runs)


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {ln.strip() for ln in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", "outputs", "mlflow.db", "mlruns", ".git"} <= ignored


def test_launcher_installs_cuda_torch_then_raypeft_gpu_like_the_makefile() -> None:
    cfg = yaml.safe_load((INFRA / "cluster-gpu.yaml").read_text())
    setup = [re.sub(r"\s+", " ", c) for c in cfg["setup_commands"]]
    args, _, _ = _dockerfile()
    torch_cmd = "~/venv/bin/python " + _torch_install_with(_makefile_var("TORCH"), args["TORCH_INDEX"])
    raypeft_cmd = "~/venv/bin/python " + _makefile_editable_install().format(extra="gpu")
    assert _pos(setup, torch_cmd) < _pos(setup, raypeft_cmd)
    assert setup[_pos(setup, raypeft_cmd)].startswith("cd ~/raypeft && ")
    assert cfg["file_mounts"]["~/raypeft"] == "."


# ----------------------------------------------------------------------------- Ray cluster launcher

def test_launcher_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((INFRA / "cluster-gpu.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "one"
    with pytest.raises(Exception, match="is not of type 'integer'"):
        validate_config(prepare_config(bad))


def test_launcher_has_a_head_and_gpu_workers_with_auth_and_mlflow() -> None:
    cfg = yaml.safe_load((INFRA / "cluster-gpu.yaml").read_text())
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    workers = {k: v for k, v in types.items() if k != head}
    assert workers and all(v["min_workers"] >= 1 for v in workers.values())
    # GPU instance families on AWS: g*, p*.
    assert all(re.match(r"[gp]\d", v["node_config"]["InstanceType"]) for v in workers.values())

    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert "MLFLOW_TRACKING_URI=http://" in head_start
    assert "infra/mlflow-server.sh" in " ".join(cfg["head_setup_commands"])


# ----------------------------------------------------------------------------- KubeRay

def _ray_containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_rayjob_runs_the_quickstart_on_the_raycluster_spec() -> None:
    job = _docs(KUBERAY / "rayjob.yaml")[0]
    cluster = _docs(KUBERAY / "raycluster.yaml")[0]
    for doc, kind in ((job, "RayJob"), (cluster, "RayCluster")):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml and raycluster.yaml drifted apart"
    assert job["spec"]["shutdownAfterJobFinishes"] is True

    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:3] == ["cd", IMAGE_REPO_DIR, "&&"]
    run = entry[3:]
    assert run[:3] == ["raypeft", "run", "configs/quickstart.yaml"]
    assert (REPO / run[2]).is_file()
    # The overrides must pass raypeft's own config validation.
    overrides = [run[i + 1] for i, tok in enumerate(run) if tok == "--set"]
    assert any(o.startswith("output_dir=/shared/") for o in overrides)
    from raypeft.pipeline.config import load_config

    cfg = load_config(REPO / run[2], overrides)
    assert cfg.tracking.artifact_location == "mlflow-artifacts:/raypeft"


def test_raycluster_has_gpu_workers_token_auth_and_mlflow_env() -> None:
    spec = _docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    assert spec["authOptions"]["mode"] == "token"
    import ray

    assert spec["rayVersion"] == ray.__version__, "rayVersion must match the Ray the image installs"
    workers = spec["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    svc = _by_kind(KUBERAY / "mlflow.yaml")["Service"]
    uri = f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    for name, c in _ray_containers(spec):
        assert _env(c).get("MLFLOW_TRACKING_URI") == uri, f"{name}: MLFLOW_TRACKING_URI should be {uri}"


def test_volumes_and_images_refer_to_what_the_manifests_define() -> None:
    spec = _docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    claims = {d["metadata"]["name"] for f in KUBERAY.glob("*.yaml") for d in _docs(f)
              if d["kind"] == "PersistentVolumeClaim"}
    shared = _by_kind(KUBERAY / "storage.yaml")["PersistentVolumeClaim"]
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for g in groups:
        pod = g["template"]["spec"]
        used = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert used and used <= claims
        assert any(m["mountPath"] == "/shared" for c in pod["containers"] for m in c["volumeMounts"])
        assert pod["securityContext"]["fsGroup"] == 1000  # the image's `ray` user (useradd --uid 1000)
    assert "--uid 1000" in (INFRA / "Dockerfile").read_text()

    deploy = _by_kind(KUBERAY / "mlflow.yaml")["Deployment"]
    images = {c["image"] for _, c in _ray_containers(spec)}
    images |= {c["image"] for c in deploy["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1, f"one raypeft image everywhere, got {images}"


def test_mlflow_manifest_runs_our_server_script_on_a_pvc() -> None:
    kinds = _by_kind(KUBERAY / "mlflow.yaml")
    assert {"Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy"} <= set(kinds)
    deploy, svc = kinds["Deployment"], kinds["Service"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = container["command"][-1]
    assert script.startswith(IMAGE_REPO_DIR + "/")
    script_path = REPO / script[len(IMAGE_REPO_DIR) + 1:]
    assert script_path == INFRA / "mlflow-server.sh"

    env = _env(container)
    read_by_script = set(re.findall(r"\$\{(\w+)", script_path.read_text()))
    assert set(env) <= read_by_script, f"env the script ignores: {set(env) - read_by_script}"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert env["RAYPEFT_MLFLOW_DIR"] in mounts  # SQLite file and artifact root on the volume
    claim = next(v for v in pod["volumes"] if v["name"] == mounts[env["RAYPEFT_MLFLOW_DIR"]])
    assert claim["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"

    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert port_names[svc["spec"]["ports"][0]["targetPort"]] == int(env["MLFLOW_PORT"])
    # The Service name must be an accepted Host header (MLflow refuses others).
    host = f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    import fnmatch

    assert any(fnmatch.fnmatch(host, pat) for pat in env["MLFLOW_ALLOWED_HOSTS"].split(","))
    policy = kinds["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()


# ----------------------------------------------------------------------------- local-cluster.sh

def _local_cluster(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAYPEFT_CLUSTER_DIR": str(tmp_path / "c"),
           "RAY": "/bin/true"}
    return subprocess.run(["bash", str(INFRA / "local-cluster.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args, message", [
    (["start", "--workers", "two"], "local-cluster: start: --workers must be a whole number, got 'two'"),
    (["start", "--object-store-mb", "10"], "local-cluster: start: --object-store-mb must be >= 100, got 10"),
    (["start", "--gpus", "1"], "local-cluster: start: unknown option '--gpus' (expected --workers, "
                               "--head-cpus, --worker-cpus, --worker-gpus, --port, --dashboard-port, "
                               "--object-store-mb)"),
    (["start", "--workers"], "local-cluster: start: --workers needs a value"),
    (["stop", "now"], "local-cluster: stop takes no options, got 'now'"),
])
def test_local_cluster_bad_usage_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    res = _local_cluster(*args, tmp_path=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == message
    assert not (tmp_path / "c").exists(), "nothing is written on bad usage"


def test_local_cluster_stop_and_status_without_a_cluster(tmp_path: Path) -> None:
    stop = _local_cluster("stop", tmp_path=tmp_path)
    assert stop.returncode == 0 and "no cluster recorded" in stop.stdout
    assert _local_cluster("status", tmp_path=tmp_path).returncode == 3
