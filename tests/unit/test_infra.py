"""The deployment files under infra/: they parse, have what KubeRay and Kubernetes need, name only the Secrets and
images that infra/README.md tells the user to create, carry no credentials, and run the MLflow server with the
flags of the test suite's own server (tests/integration/conftest.py), so that what is tested is what is deployed.
Parsing only: no network, no Docker, no Kubernetes."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
README = (INFRA / "README.md").read_text()
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob-pretokenize.yaml"
COMPOSE = INFRA / "mlflow" / "compose.yaml"
MLFLOW_K8S = INFRA / "mlflow" / "k8s" / "mlflow.yaml"
CONFTEST = ROOT / "tests" / "integration" / "conftest.py"

# The image infra/README.md tells the user to build (a placeholder they substitute), used by every Ray pod.
PROJECT_IMAGE = "<account>.dkr.ecr.<region>.amazonaws.com/tokenflow-ray:<tag>"
# Where the image puts the repository (WORKDIR in infra/Dockerfile).
IMAGE_CODE_DIR = "/home/ray/tokenflow-ray"
# Where the jobs' configurations name the Ray custom resources their stages ask for (tokenize actors, training
# workers). The GPU worker groups advertise them, one unit per GPU, as ray_cluster.yaml's node types do.
JOB_CONFIGS = [*(ROOT / "jobs" / "configs").glob("*.yaml"), *(ROOT / "pipelines" / "configs").glob("*.yaml")]
RESOURCE_FIELDS = ("tokenizer_resources", "worker_resources")
# `mlflow server` flags the deployments have and the test fixture does not: none (the fixture runs with
# MLFLOW_SERVER_FLAGS, tests/integration/conftest.py).
PRODUCTION_ONLY_FLAGS: set[str] = set()
SENSITIVE_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|DB_URI|CREDENTIAL", re.IGNORECASE)


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _yaml_files() -> list[Path]:
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in _yaml_files() if p != COMPOSE for d in _load_all(p)]


def _walk(obj):
    """Every mapping inside obj, depth first."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _containers(doc: dict) -> list[dict]:
    return [c for m in _walk(doc) for c in (m.get("containers") or []) if isinstance(m.get("containers"), list)]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    (cluster,) = _load_all(RAYCLUSTER)
    (job,) = _load_all(RAYJOB)
    return [("RayCluster", cluster["spec"]), ("RayJob.rayClusterSpec", job["spec"]["rayClusterSpec"])]


def _custom_resources(ray_start_params: dict) -> dict:
    """rayStartParams.resources in KubeRay's format: '"{\\"name\\": 1}"' (a JSON object inside quotes, with
    backslash-escaped quotes), decoded the way Ray's KubeRay autoscaler does."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"KubeRay wants resources quoted: {raw!r}"
    value = json.loads(raw[1:-1].replace("\\", ""))
    assert isinstance(value, dict) and all(isinstance(v, int) for v in value.values()), raw
    return value


def _requested_custom_resources() -> set[str]:
    names: set[str] = set()
    for path in JOB_CONFIGS:
        cfg = yaml.safe_load(path.read_text()) or {}
        for field in RESOURCE_FIELDS:
            names |= set(cfg.get(field) or {})
    return names


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (INFRA / "Dockerfile").read_text(), re.MULTILINE)
    assert m, f"infra/Dockerfile has no ARG {name}=<default>"
    return m.group(1)


def _flags(args: list[str]) -> dict[str, str | None]:
    """`--flag value` / `--flag` (boolean) tokens of a command line as {flag: value or None}."""
    out: dict[str, str | None] = {}
    for i, tok in enumerate(args):
        if tok.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[tok] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def _fixture_mlflow_flags() -> set[str]:
    """The `mlflow server` flags of the mlflow_server fixture, read from the source (not imported: importing a
    conftest from a unit test would register its fixtures twice). Also reads a module-level constant whose name
    mentions MLFLOW, should the flags be factored out into one."""
    tree = ast.parse(CONFTEST.read_text())
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "mlflow_server"]
    nodes += [
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and "MLFLOW" in t.id.upper() for t in n.targets)
    ]
    assert nodes, "tests/integration/conftest.py has no mlflow_server fixture"
    return {
        c.value
        for n in nodes
        for c in ast.walk(n)
        if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith("--")
    }


def _deployed_mlflow_commands() -> dict[str, list[str]]:
    compose = _load_all(COMPOSE)[0]["services"]["mlflow"]["command"]
    (deployment,) = [d for d in _load_all(MLFLOW_K8S) if d["kind"] == "Deployment"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return {"compose": [str(a) for a in compose], "k8s": [str(a) for a in c["command"] + c["args"]]}


# ---------------------------------------------------------------------------------------------------------------


def test_every_yaml_parses_and_every_manifest_is_a_kubernetes_object():
    files = _yaml_files()
    assert {RAYCLUSTER, RAYJOB, COMPOSE, MLFLOW_K8S} <= set(files)
    for path in files:
        assert _load_all(path), f"{path} is empty"
    for path, doc in _k8s_docs():
        where = f"{path.relative_to(ROOT)}: {doc.get('kind')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), where
        for c in _containers(doc):
            assert c.get("name") and c.get("image"), f"{where}: a container without name or image"
            assert c.get("resources", {}).get("requests") or c.get("resources", {}).get("limits"), where
        if doc["kind"] in ("Deployment", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
    compose = _load_all(COMPOSE)[0]
    assert {"postgres", "mlflow"} <= set(compose["services"])
    assert compose["services"]["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name,spec", [pytest.param(n, s, id=n) for n, s in _ray_cluster_specs()])
def test_ray_cluster_has_what_kuberay_requires(name, spec):
    assert spec["rayVersion"] == _dockerfile_arg("RAY_VERSION"), f"{name}: rayVersion is not the image's Ray"
    assert spec["enableInTreeAutoscaling"] is True
    opts = spec["autoscalerOptions"]
    assert isinstance(opts["idleTimeoutSeconds"], int) and opts["idleTimeoutSeconds"] > 0
    assert opts["upscalingMode"] in ("Default", "Conservative", "Aggressive")
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must schedule no work"
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        # KubeRay passes rayStartParams to `ray start`: every value must be a string.
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group.get("groupName")
        ray_container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first one
        assert ray_container["image"] == PROJECT_IMAGE
        assert {"cpu", "memory"} <= set(ray_container["resources"]["limits"])

    workers = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in workers}) == len(workers)
    for g in workers:
        assert g["groupName"] and g["minReplicas"] == 0 and g["maxReplicas"] >= 1, g["groupName"]
        assert 0 <= g.get("replicas", 0) <= g["maxReplicas"]
    gpus = sorted(_gpus(g["template"]["spec"]["containers"][0]) for g in workers)
    assert gpus[0] == 0, "no CPU-only worker group"
    assert 1 in gpus and 8 in gpus, f"expected a 1-GPU and an 8-GPU group, got {gpus}"


@pytest.mark.parametrize("name,spec", [pytest.param(n, s, id=n) for n, s in _ray_cluster_specs()])
def test_worker_groups_advertise_the_custom_resources_the_jobs_ask_for(name, spec):
    assert _custom_resources(spec["headGroupSpec"]["rayStartParams"]) == {}
    advertised = set()
    for g in spec["workerGroupSpecs"]:
        container = g["template"]["spec"]["containers"][0]
        resources = _custom_resources(g.get("rayStartParams", {}))
        if gpus := _gpus(container):
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], g["groupName"]
            # One custom resource per GPU group, one unit per GPU: a stage asking for {name: 1} and 1 GPU per
            # actor packs as many actors on the node as it has GPUs.
            assert len(resources) == 1 and set(resources.values()) == {gpus}, g["groupName"]
        else:
            assert resources == {}, f"{g['groupName']}: CPU-only demand needs no custom resource"
        advertised |= set(resources)
    requested = _requested_custom_resources()
    assert requested <= advertised, f"the jobs ask for {requested - advertised}, which no worker group offers"
    for resource in advertised:
        assert f"`{resource}`" in README, f"infra/README.md does not document the custom resource {resource}"


def test_ray_autoscaler_reads_the_clusters_as_intended():
    """Ray's own KubeRay autoscaler turns each cluster spec into its autoscaling config and validates it against
    the autoscaler's schema: the node types, their resources and limits are what the manifests mean."""
    kuberay = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    for name, spec in _ray_cluster_specs():
        config = kuberay._derive_autoscaling_config_from_ray_cr(
            {"metadata": {"name": "tokenflow", "namespace": "tokenflow"}, "spec": spec}
        )
        types = config["available_node_types"]
        assert types["headgroup"]["resources"]["CPU"] == 0, name
        assert config["idle_timeout_minutes"] == spec["autoscalerOptions"]["idleTimeoutSeconds"] / 60
        for g in spec["workerGroupSpecs"]:
            node = types[g["groupName"]]
            assert node["min_workers"] == 0 and node["max_workers"] == g["maxReplicas"]
            custom = {k: v for k, v in node["resources"].items() if k not in ("CPU", "GPU", "memory")}
            assert node["resources"]["CPU"] > 0
            if node["resources"].get("GPU"):
                assert list(custom.values()) == [node["resources"]["GPU"]], g["groupName"]
            else:
                assert custom == {}, g["groupName"]


def test_rayjob_runs_pretokenize_from_the_image_and_cleans_up():
    (cluster,) = _load_all(RAYCLUSTER)
    (job,) = _load_all(RAYJOB)
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert "clusterSelector" not in spec, "the job brings its own cluster (shutdownAfterJobFinishes)"
    # The same groups, images, resources and Secrets as the long-lived cluster: edit both together.
    assert spec["rayClusterSpec"] == cluster["spec"], "rayClusterSpec differs from raycluster.yaml's spec"

    args = spec["entrypoint"].split()
    assert args[:2] == ["python", f"{IMAGE_CODE_DIR}/jobs/pretokenize.py"]
    flags = _flags(args)
    assert {"--config", "--input", "--output", "--tokenizer"} <= set(flags)
    # Paths inside the image are paths of this repository.
    for path in (args[1], flags["--config"]):
        assert (ROOT / Path(path).relative_to(IMAGE_CODE_DIR)).is_file(), path
    assert all(flags[f].strip("'").startswith("s3://") for f in ("--input", "--output", "--tokenizer"))
    assert "working_dir" not in spec.get("runtimeEnvYAML", ""), "the code is in the image"


def test_every_secret_referenced_is_one_the_readme_creates():
    created = set(re.findall(r"kubectl create secret generic\s+([a-z0-9][-a-z0-9]*)", README))
    referenced = set()
    for _, doc in _k8s_docs():
        for m in _walk(doc):
            for key in ("secretKeyRef", "secretRef"):
                if key in m:
                    referenced.add(m[key]["name"])
            if "authOptions" in m and "secretName" in m["authOptions"]:
                referenced.add(m["authOptions"]["secretName"])
    assert referenced, "no Secret referenced at all"
    assert referenced <= created, f"referenced but never created in infra/README.md: {referenced - created}"
    assert created <= referenced, f"the README creates Secrets nothing uses: {created - referenced}"


def test_every_image_is_one_the_readme_names():
    images = {c["image"] for _, doc in _k8s_docs() for c in _containers(doc)}
    images |= {s["image"] for s in _load_all(COMPOSE)[0]["services"].values()}
    assert PROJECT_IMAGE in images
    for image in images:
        assert f"`{image}`" in README or image in README, f"infra/README.md does not name the image {image}"
        assert not image.endswith(":latest") and ":" in image, f"unpinned image {image}"
    assert re.search(r"docker build .*-f infra/Dockerfile", README)
    # The MLflow server is the same image on Kubernetes and on the VM.
    (deployment,) = [d for d in _load_all(MLFLOW_K8S) if d["kind"] == "Deployment"]
    assert (
        deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        == (_load_all(COMPOSE)[0]["services"]["mlflow"]["image"])
    )


def test_no_credentials_in_the_files():
    for path, doc in _k8s_docs():
        for m in _walk(doc):
            for env in m.get("env") or []:
                if isinstance(env, dict) and SENSITIVE_ENV.search(env.get("name", "")):
                    assert "value" not in env, f"{path.name}: {env['name']} has a literal value"
            assert m.get("kind") != "Secret", f"{path.name} defines a Secret: create it with kubectl instead"
    for name, service in _load_all(COMPOSE)[0]["services"].items():
        env = service.get("environment") or {}
        items = env.items() if isinstance(env, dict) else [(e.partition("=")[0], e.partition("=")[2]) for e in env]
        for key, value in items:
            if SENSITIVE_ENV.search(key):
                assert not value or str(value).startswith("${"), f"compose {name}: {key} has a literal value"
    # Database URIs carry their password only as a variable or a placeholder; no AWS key ids anywhere.
    texts = {p: p.read_text() for p in [*_yaml_files(), INFRA / "mlflow" / "env.example", INFRA / "Dockerfile"]}
    for path, text in texts.items():
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), path
        for password in re.findall(r"postgres(?:ql)?(?:\+\w+)?://[^:/\s]+:([^@\s]+)@", text):
            assert password.startswith(("$", "<")), f"{path.name}: a literal database password"
    for line in texts[INFRA / "mlflow" / "env.example"].splitlines():
        key, _, value = line.partition("=")
        if not line.startswith("#") and SENSITIVE_ENV.search(key):
            assert not value.strip(), f"env.example: {key} has a value"


def test_mlflow_server_flags_are_the_test_fixtures_except_the_backend():
    fixture = _fixture_mlflow_flags()
    assert "--backend-store-uri" in fixture, "could not read the fixture's flags"
    commands = _deployed_mlflow_commands()
    for where, command in commands.items():
        assert command[:2] == ["mlflow", "server"], where
        flags = _flags(command[2:])
        assert fixture <= set(flags), f"{where}: missing the fixture's {fixture - set(flags)}"
        extra = set(flags) - fixture
        assert extra <= PRODUCTION_ONLY_FLAGS, (
            f"{where}: flags the tests never run with: {extra - PRODUCTION_ONLY_FLAGS}"
        )
        # The backend store is the one intended difference: PostgreSQL here, sqlite in the tests.
        backend = flags["--backend-store-uri"]
        assert backend.startswith("postgresql://") or backend == "$(DB_URI)", f"{where}: {backend}"
        assert flags["--host"] == "0.0.0.0" and flags["--port"] == "5000", where
        assert flags["--artifacts-destination"].startswith(("s3://", "${")), where
        assert "--serve-artifacts" in flags and flags["--serve-artifacts"] is None, where
        assert flags["--allowed-hosts"] and flags["--allowed-hosts"] != "*", where
    assert set(_flags(commands["compose"][2:])) == set(_flags(commands["k8s"][2:]))


def test_ray_pods_reach_mlflow_at_a_host_the_server_accepts():
    docs = _load_all(MLFLOW_K8S)
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    (cluster,) = _load_all(RAYCLUSTER)
    uris = {e["value"] for c in _containers(cluster) for e in c.get("env", []) if e["name"] == "MLFLOW_TRACKING_URI"}
    assert len(uris) == 1
    uri = urlparse(uris.pop())
    assert (uri.hostname, uri.port) == (service["metadata"]["name"], port["port"])
    allowed = _flags(_deployed_mlflow_commands()["k8s"])["--allowed-hosts"].split(",")
    assert uri.netloc in allowed, f"the server would reject Host: {uri.netloc}"


def test_dockerfile_builds_from_what_the_dockerignore_sends():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", dockerfile, re.MULTILINE)
    assert _dockerfile_arg("PYTHON_TAG") == "py311"
    assert "[dev]" not in dockerfile, "the image installs no dev extra"
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] == "ray", "the image must run as the non-root user ray"

    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore is an allow-list"
    included = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert not included & {"tests", "samples", "bench", ".venv", ".git", "demo_output"}
    sources = set()
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE):
        parts = [p for p in line.split() if not p.startswith("--")]
        sources |= {p.rstrip("/") for p in parts[:-1]}
    assert sources, "no COPY in infra/Dockerfile"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert src in included, f"COPY {src}: excluded by .dockerignore"
    # pyproject.toml names README.md as the package's readme: the build needs it.
    assert "README.md" in sources


def test_ray_cluster_yaml_has_the_same_image_and_node_types():
    """The cluster launcher config and the KubeRay cluster offer the same GPU node types to the jobs."""
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    image = config["docker"]["image"]
    assert re.fullmatch(r"[^/\s]+\.dkr\.ecr\.[^/\s]+\.amazonaws\.com/tokenflow-ray:\S+", image), (
        f"ray_cluster.yaml runs {image}, not the tokenflow-ray image infra/README.md builds"
    )
    standard = {"CPU", "GPU", "memory", "object_store_memory"}

    def gpu_types(pairs):
        return sorted((gpus, sorted(custom.items())) for gpus, custom in pairs if gpus)

    launcher = gpu_types(
        (t["resources"].get("GPU", 0), {k: v for k, v in t["resources"].items() if k not in standard})
        for t in config["available_node_types"].values()
    )
    (_, spec), _ = _ray_cluster_specs()
    kuberay = gpu_types(
        (
            _gpus(g["template"]["spec"]["containers"][0]),
            _custom_resources(g.get("rayStartParams", {})),
        )
        for g in spec["workerGroupSpecs"]
    )
    assert kuberay == launcher, f"GPU node types differ: KubeRay {kuberay}, ray_cluster.yaml {launcher}"
