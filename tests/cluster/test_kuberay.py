"""The KubeRay manifests (cluster/kuberay-*.yaml), parsed and checked against what the code relies on: the Ray
version, the entry point and config of the RayJob, the resources jobs/configs/ ask for, the shared volume, where
the project is installed from, that the dashboard and Job API stay inside the cluster network, and that the
RayService's Serve config is the one sparserm.serve.serve_config generates, with import paths that build the apps
``sparserm serve`` builds."""
from __future__ import annotations

import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml

from sparserm.config import Config, ConfigError, ServeConfig, build, load_config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = {"RayCluster": "kuberay-raycluster.yaml", "RayJob": "kuberay-rayjob.yaml",
             "RayService": "kuberay-rayservice.yaml"}
SHARED_CLAIM, SHARED_MOUNT = "sparserm-shared", "/mnt/shared"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def text(kind: str) -> str:
    return (ROOT / "cluster" / MANIFESTS[kind]).read_text()


def resource(kind: str) -> dict:
    """The manifest's one ``ray.io`` object (a manifest may also hold plain Kubernetes objects)."""
    (obj,) = [d for d in yaml.safe_load_all(text(kind)) if d and d["apiVersion"].startswith("ray.io/")]
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == kind
    return obj


def cluster_spec(kind: str) -> dict:
    spec = resource(kind)["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[kind]


@dataclass(frozen=True)
class Group:
    """One head or worker group as Ray sees it: resources of a node, how many nodes at most, what a pod mounts."""

    name: str
    cpus: float
    gpus: float
    max_nodes: int
    images: tuple[str, ...]
    mounts: dict  # mountPath -> PVC claim name


def _quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def group(spec: dict, name: str, nodes: int) -> Group:
    """``rayStartParams`` num-cpus / num-gpus when set, else what KubeRay passes: the container's limits."""
    pod = spec["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
              if "persistentVolumeClaim" in v}
    (ray,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
    limits, params = ray.get("resources", {}).get("limits", {}), spec.get("rayStartParams") or {}
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    mounts = {m["mountPath"]: claims.get(m["name"]) for m in ray.get("volumeMounts", [])}
    return Group(name, cpus, gpus, nodes, tuple(c["image"] for c in pod["containers"]), mounts)


def groups(kind: str) -> tuple[Group, list[Group]]:
    spec = cluster_spec(kind)
    head = group(spec["headGroupSpec"], "head", 1)
    workers = [group(w, w["groupName"], int(w.get("maxReplicas", w.get("replicas", 1))))
               for w in spec["workerGroupSpecs"]]
    return head, workers


def actor_requests(cfg: Config, gpu_cluster: bool = True) -> dict[str, tuple[float, float]]:
    """(num_cpus, num_gpus) of one actor, worker or replica of each kind a config starts (sparserm.config's
    resource fields); a vLLM engine counts its tensor-parallel ranks."""
    a, v = cfg.align, cfg.align.generate.vllm
    req = {"features actor": (cfg.features.num_cpus, cfg.features.num_gpus),
           "reward-head worker": (cfg.reward.num_cpus, cfg.reward.num_gpus),
           "DPO worker": (a.train.num_cpus, a.train.num_gpus),
           "policy": (a.policy.num_cpus, a.policy.num_gpus), "scorer": (a.scorer.num_cpus, a.scorer.num_gpus),
           "judge": (a.judge.num_cpus, a.judge.num_gpus),
           "reference-cache actor": (a.reference_cache.num_cpus, a.reference_cache.num_gpus),
           "steer actor": (cfg.steer.num_cpus, cfg.steer.num_gpus),
           "serve replica": (cfg.serve.num_cpus, cfg.serve.num_gpus)}
    if a.generate.engine == "vllm" or (a.generate.engine == "auto" and gpu_cluster):
        req["vLLM engine"] = (v.num_cpus, v.num_gpus * v.tensor_parallel_size)
    return req


def align_loop(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) the alignment loop holds at once: the vLLM engines, the DPO workers, the policy and scorer."""
    a, v, t = cfg.align, cfg.align.generate.vllm, cfg.align.train
    parts = [(v.num_engines * v.num_cpus, v.num_engines * v.num_gpus * v.tensor_parallel_size),
             (t.num_workers * t.num_cpus, t.num_workers * t.num_gpus),
             (a.policy.num_cpus, a.policy.num_gpus), (a.scorer.num_cpus, a.scorer.num_gpus)]
    return sum(c for c, _ in parts), sum(g for _, g in parts)


def fits_a_node(request: tuple[float, float], workers: list[Group]) -> bool:
    return any(request[0] <= w.cpus + 1e-9 and request[1] <= w.gpus + 1e-9 for w in workers)


def capacity(workers: list[Group]) -> tuple[float, float]:
    return sum(w.cpus * w.max_nodes for w in workers), sum(w.gpus * w.max_nodes for w in workers)


# ------------------------------------------------------------------ every manifest

@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_ray_version_and_images_are_the_installed_ray(kind):
    import ray

    assert f"ray[train,data,serve]=={ray.__version__}" in PYPROJECT["project"]["dependencies"]
    assert cluster_spec(kind)["rayVersion"] == ray.__version__
    head, workers = groups(kind)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    for g in (head, *workers):
        for image in g.images:
            assert image == f"rayproject/ray:{ray.__version__}-{py}" + ("-gpu" if g.gpus > 0 else ""), (g.name, image)


def exposures(manifest: str) -> list[str]:
    """Lines that would expose a port beyond the cluster network (a LoadBalancer or NodePort Service, an Ingress,
    enableIngress, a host port or the host network) and carry no comment saying so."""
    pattern = re.compile(r"\b(LoadBalancer|NodePort|kind:\s*Ingress|enableIngress:\s*true|hostPort|hostNetwork:\s*true)")
    return [line for line in manifest.splitlines()
            if pattern.search(line.split("#", 1)[0]) and "#" not in line]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_dashboard_and_job_api_stay_inside_the_cluster_network(kind):
    assert exposures(text(kind)) == []
    head = cluster_spec(kind)["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    # 0.0.0.0 inside the pod is what lets the ClusterIP Service (and KubeRay) reach the dashboard; said in a comment
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert re.search(r'dashboard-host: "0\.0\.0\.0"\s+#', text(kind))
    kinds = {d["kind"] for d in yaml.safe_load_all(text(kind)) if d}
    assert not kinds & {"Service", "Ingress", "Route", "Gateway"}


def test_the_exposure_check_finds_an_exposed_dashboard():
    assert exposures("    serviceType: LoadBalancer\n") == ["    serviceType: LoadBalancer"]
    assert exposures("  enableIngress: true\n") and exposures("kind: Ingress\n")
    assert exposures("    serviceType: NodePort   # the dashboard on every node's port 30265, on purpose\n") == []


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_pod_mounts_the_shared_volume(kind):
    head, workers = groups(kind)
    for g in (head, *workers):
        assert g.mounts.get(SHARED_MOUNT) == SHARED_CLAIM, g.name
    assert all(w.gpus >= 1 for w in workers) and head.cpus == 0  # stage actors never land on the head


def test_the_shared_volume_is_defined_read_write_many():
    (pvc,) = [d for d in yaml.safe_load_all(text("RayCluster")) if d and d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == SHARED_CLAIM and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "jobs" / "configs").glob("*.yaml")))
def test_every_config_fits_the_raycluster_workers(name):
    _, workers = groups("RayCluster")
    cfg = load_config(ROOT / "jobs" / "configs" / name)
    for what, request in actor_requests(cfg).items():
        assert fits_a_node(request, workers), f"{name}: a {what} asks {request} (CPUs, GPUs); workers: {workers}"
    cpus, gpus = capacity(workers)
    loop = align_loop(cfg)
    assert loop[0] <= cpus and loop[1] <= gpus


# ------------------------------------------------------------------ where the project comes from

def wheel_name() -> str:
    """What ``pip wheel . --no-deps`` builds from this checkout (a pure-Python project: py3-none-any)."""
    project = PYPROJECT["project"]
    return f"{project['name']}-{project['version']}-py3-none-any.whl"


def check_pip(specs: list[str], mount_paths: set[str]) -> None:
    """Each pip entry is this project's wheel on the shared volume (extras from pyproject allowed), never a URL."""
    assert specs
    extras_known = set(PYPROJECT["project"]["optional-dependencies"])
    for spec in specs:
        path, _, extras = spec.partition("[")
        assert "://" not in spec and "your-org" not in spec and "example" not in spec, spec
        assert PurePosixPath(path).name == wheel_name(), spec
        assert any(PurePosixPath(path).is_relative_to(m) for m in mount_paths), spec
        assert set(filter(None, extras.rstrip("]").split(","))) <= extras_known, spec


def test_the_wheel_carries_the_job_entry_points_and_configs():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert "jobs*" in setuptools["packages"]["find"]["include"]
    assert setuptools["package-data"]["jobs"] == ["configs/*.yaml"]


def test_check_pip_refuses_a_placeholder_url():
    with pytest.raises(AssertionError):
        check_pip(["https://github.com/your-org/sparserm/archive/main.zip"], {SHARED_MOUNT})
    with pytest.raises(AssertionError):
        check_pip([f"/tmp/{wheel_name()}"], {SHARED_MOUNT})  # not on the shared volume
    check_pip([f"{SHARED_MOUNT}/wheels/{wheel_name()}[gpu]"], {SHARED_MOUNT})


# ------------------------------------------------------------------ the RayJob: the alignment job

def entrypoint() -> tuple[str, list[str]]:
    """(the folder the entrypoint ``cd``\\ s into, the ``python -m ...`` words after it)."""
    first, second = [shlex.split(part) for part in resource("RayJob")["spec"]["entrypoint"].split("&&")]
    assert first[0] == "cd" and len(first) == 2
    return first[1], second


def test_rayjob_runs_the_alignment_job_entry_point_with_a_config_of_jobs_configs():
    from sparserm.cli import build_parser

    cwd, words = entrypoint()
    assert words[:3] == ["python", "-m", "jobs.align"]
    assert (ROOT / "jobs" / "align.py").is_file()
    config, rest = PurePosixPath(words[3]), words[4:]
    # the shared volume's configs/ is a copy of jobs/configs/ (kuberay-raycluster.yaml)
    assert config.parent == PurePosixPath("configs") and (ROOT / "jobs" / "configs" / config.name).is_file()
    args = build_parser().parse_args(["align", str(ROOT / "jobs" / "configs" / config.name), *rest])
    assert args.func and args.output_dir.startswith(SHARED_MOUNT + "/")
    cfg = load_config(args.config, args.overrides)
    assert cfg.run.ray_address == "auto" and cfg.align.rounds >= 1
    # the config's relative data paths, read from the entrypoint's folder, land on the shared volume
    assert PurePosixPath(cwd).is_relative_to(SHARED_MOUNT)
    for source in cfg.data.sources:
        path = PurePosixPath(_normpath(PurePosixPath(cwd) / source.path))
        assert path.is_relative_to(f"{SHARED_MOUNT}/data"), source.path


def _normpath(p: PurePosixPath) -> str:
    import posixpath

    return posixpath.normpath(str(p))


def test_rayjob_resources_fit_what_its_config_asks():
    _, words = entrypoint()
    cfg = load_config(ROOT / "jobs" / "configs" / PurePosixPath(words[3]).name)
    head, workers = groups("RayJob")
    for what, request in actor_requests(cfg).items():
        assert fits_a_node(request, workers), f"a {what} asks {request}; workers: {workers}"
    cpus, gpus = align_loop(cfg)
    assert (cpus, gpus) == (7.0, pytest.approx(1.0))  # the config's comment: the loop on one GPU
    assert any(cpus <= w.cpus and gpus <= w.gpus + 1e-9 for w in workers)  # and on one node of the group


def test_rayjob_runtime_env_installs_the_wheel_and_shares_the_cache():
    env = yaml.safe_load(resource("RayJob")["spec"]["runtimeEnvYAML"])
    head, workers = groups("RayJob")
    check_pip(env["pip"], set(head.mounts) & set.intersection(*(set(w.mounts) for w in workers)))
    assert "working_dir" not in env  # the code is the wheel's
    assert PurePosixPath(env["env_vars"]["SPARSERM_CACHE"]).is_relative_to(SHARED_MOUNT)
    assert PurePosixPath(env["env_vars"]["HF_HOME"]).is_relative_to(SHARED_MOUNT)


# ------------------------------------------------------------------ the RayService: the generated Serve config

def serve_config_of_manifest() -> dict:
    return yaml.safe_load(resource("RayService")["spec"]["serveConfigV2"])


def generator_argv() -> list[str]:
    """The ``python -m sparserm.serve.serve_config ...`` command written in the manifest's comment."""
    lines = text("RayService").splitlines()
    start = next(i for i, line in enumerate(lines) if "python -m sparserm.serve.serve_config" in line)
    command = []
    for line in lines[start:]:
        part = line.lstrip("#").strip()
        command.append(part.rstrip("\\"))
        if not part.endswith("\\"):
            break
    words = shlex.split(" ".join(command))
    assert words[:3] == ["python", "-m", "sparserm.serve.serve_config"]
    return words[3:]


def test_rayservice_serve_config_is_the_generated_one():
    from ray.serve.schema import ServeDeploySchema

    from sparserm.serve.serve_config import generate

    with pytest.raises(SystemExit, match="--env 'FOO': expected NAME=VALUE"):
        generate(["--rm-dir", "/m", "--env", "FOO"])
    config = serve_config_of_manifest()
    assert config == generate(generator_argv())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay hand to Serve
    assert [a["route_prefix"] for a in config["applications"]] == ["/rm", "/"]
    assert config["http_options"]["host"] == "0.0.0.0"  # inside the pod, for the ClusterIP Serve Service


def test_rayservice_replicas_fit_its_workers_and_install_the_wheel():
    config = serve_config_of_manifest()
    _, workers = groups("RayService")
    asks = []
    for app in config["applications"]:
        check_pip(app["runtime_env"]["pip"], set.intersection(*(set(w.mounts) for w in workers)))
        for dep in app["deployments"]:
            opts = dep["ray_actor_options"]
            n = dep.get("num_replicas") or dep["autoscaling_config"]["max_replicas"]
            assert fits_a_node((opts["num_cpus"], opts["num_gpus"]), workers)
            asks.append((n * opts["num_cpus"], n * opts["num_gpus"]))
        folder = app["args"].get("rm_dir") or app["args"]["map_dir"]
        assert PurePosixPath(folder).is_relative_to(f"{SHARED_MOUNT}/runs")
    cpus, gpus = capacity(workers)
    assert sum(c for c, _ in asks) <= cpus and sum(g for _, g in asks) <= gpus


def _folders(tmp_path) -> dict:
    """Folders the app builders accept (they check the marker files; replicas load the contents)."""
    from sparserm.steering.store import MANIFEST, MAP_FILE

    rm, steer = tmp_path / "rm", tmp_path / "map"
    rm.mkdir()
    steer.mkdir()
    (rm / "rm.json").write_text("{}")
    (steer / MANIFEST).write_text("{}")
    (steer / MAP_FILE).write_bytes(b"")
    return {"rm_dir": str(rm), "map_dir": str(steer)}


def test_rayservice_import_paths_build_the_apps_the_cli_builds(tmp_path, monkeypatch):
    import importlib

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from sparserm.serve.app import build_app
    from sparserm.serve.guard import digest
    from sparserm.serve.steer_app import build_steer_app

    monkeypatch.setenv("SPARSERM_SERVE_TOKEN", "s3cret")  # read where the app is built, as the CLI reads it
    folders, cli_builders = _folders(tmp_path), {"rm_dir": build_app, "map_dir": build_steer_app}
    for app in serve_config_of_manifest()["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        (key,) = set(app["args"]) - {"serve"}
        args = {**app["args"], key: folders[key]}  # the manifest's folder, here
        built = call_user_app_builder_with_args_if_necessary(builder, args)  # what Serve does with import_path
        dep, (want,) = built._bound_deployment, app["deployments"]
        cfg = build(ServeConfig, app["args"]["serve"])
        assert (cfg.host, cfg.num_cpus, cfg.num_gpus) == ("0.0.0.0", 2.0, 0.5)
        assert dep.name == want["name"]
        assert dep.init_args == (folders[key], cfg, digest("s3cret"))
        assert dep.ray_actor_options == want["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
        assert dep.num_replicas == want["num_replicas"] and dep.max_ongoing_requests == want["max_ongoing_requests"]
        cli = cli_builders[key](folders[key], cfg)._bound_deployment  # `sparserm serve ...` builds the same
        assert (cli.name, cli.init_args, cli.ray_actor_options) == (dep.name, dep.init_args, dep.ray_actor_options)


# ------------------------------------------------------------------ the generator and builders themselves

def test_serve_config_of_one_app_with_autoscaling():
    from ray.serve.schema import ServeDeploySchema

    from sparserm.serve.serve_config import RM_IMPORT_PATH, generate

    config = generate(["--rm-dir", "/x/rm", "serve.autoscaling={min_replicas: 1, max_replicas: 3}",
                       "serve.num_gpus=1"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("sparserm", "/", RM_IMPORT_PATH)
    (dep,) = app["deployments"]
    assert "num_replicas" not in dep and dep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    assert dep["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0} and "runtime_env" not in app
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}  # ServeConfig's loopback default
    with pytest.raises(ValueError):
        generate([])


def test_builders_refuse_unknown_args_and_settings(tmp_path):
    from sparserm.serve.builders import rm_app, steer_app

    folders = _folders(tmp_path)
    with pytest.raises(ConfigError, match="rm_dir"):
        rm_app({"rm_dir": folders["rm_dir"], "srve": {}})
    with pytest.raises(ConfigError, match="serve.num_gpu"):
        rm_app({"rm_dir": folders["rm_dir"], "serve": {"num_gpu": 1}})
    with pytest.raises(ConfigError, match="serve.port"):
        steer_app({"map_dir": folders["map_dir"], "serve": {"port": 0}})
    with pytest.raises(FileNotFoundError):
        steer_app({"map_dir": folders["rm_dir"]})  # not a steering-map folder
    assert rm_app({"rm_dir": folders["rm_dir"]})._bound_deployment.init_args[1] == ServeConfig()


def test_the_job_runtime_env_installs_the_uploaded_working_dir():
    """Ray runs a runtime env's pip in an empty folder, so ``-e .`` finds no project there (seen on a ``ray start``
    cluster); the working dir it uploaded is named by ``${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}``."""
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and env["pip"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]
    assert env["env_vars"]["SPARSERM_CACHE"].startswith("/mnt/shared/")
    # the one-machine file (the README's first cluster block): the same but for the shared cache
    local = yaml.safe_load((ROOT / "cluster" / "runtime_env.local.yaml").read_text())
    env["env_vars"].pop("SPARSERM_CACHE")
    assert local == env
