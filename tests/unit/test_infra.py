"""infra/ is checked without network or docker: the cluster launcher YAML against Ray's own schema (and
Ray's own config preparation), the KubeRay manifests against the ray.io/v1 CRD fields and against this
repo (the `mvit` subcommands, config files and overrides their entrypoints run, the image the Dockerfile
builds), the compose file's services against each other, and the Dockerfile against the files it copies
and the pinned set. Each validator returns a list of problems; every one is also shown to reject a
mutated copy, so a validator that accepts anything fails here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from omegaconf import MISSING

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
LAUNCHER = INFRA / "aws" / "cluster.yaml"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "compose.yaml"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
CONSTRAINTS = REPO / "constraints.txt"

SECRET_NAME = "mvit-s3"  # the Kubernetes Secret holding the object-storage credentials (created by hand)
SECRET_LIKE = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY)", re.IGNORECASE)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
STAGE_CONFIGS = {
    "preprocess": "pipelines.preprocess.config:PreprocessConfig",
    "train": "pipelines.train.config:TrainConfig",
    "evaluate": "pipelines.evaluate.job:EvaluateConfig",
    "register": "pipelines.register.job:RegisterConfig",
}


# ---------------------------------------------------------------------------------------------------
# What the repo pins
# ---------------------------------------------------------------------------------------------------
def pinned(package: str) -> str:
    for line in CONSTRAINTS.read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package.lower():
            return version.strip()
    raise AssertionError(f"{package} is not pinned in {CONSTRAINTS}")


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def project_python() -> str:
    """'3.11' from requires-python '>=3.11,<3.12' (the project supports exactly one minor version)."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.search(r">=\s*(\d+\.\d+)", spec)
    assert match, spec
    return match.group(1)


def config_class(stage: str) -> type:
    module_name, cls_name = STAGE_CONFIGS[stage].split(":")
    return getattr(__import__(module_name, fromlist=[cls_name]), cls_name)


def literal_credentials(text: str) -> list[str]:
    """Things that look like a committed credential: an AWS key id, or a secret-named environment
    variable (upper case, as env files, compose and Dockerfiles spell them) given a literal value."""
    found = [f"AWS access key id {m.group(0)[:4]}..." for m in AWS_KEY_ID.finditer(text)]
    for match in re.finditer(r"(?m)^[ \t]*-?[ \t]*(?:export[ \t]+)?([A-Z][A-Z0-9_]*)[ \t]*[:=][ \t]*(\S+)", text):
        key, value = match.groups()
        if SECRET_LIKE.search(key) and not value.startswith(("${", "$", "#")) and value not in ('""', "''"):
            found.append(f"{key} has a literal value")
    return found


# ---------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuations joined

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        out, pending = [], ""
        for raw in text.splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):  # a comment inside a continued instruction
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            full = pending + line
            pending = ""
            word, _, args = full.partition(" ")
            out.append((word.upper(), args.strip()))
        return cls(out)

    def args(self) -> dict[str, str]:
        """ARG defaults (the first declaration with a value wins, as in a build without --build-arg)."""
        found: dict[str, str] = {}
        for word, args in self.instructions:
            if word == "ARG" and "=" in args:
                name, value = args.split("=", 1)
                found.setdefault(name.strip(), value.strip())
        return found

    def expand(self, text: str, overrides: dict[str, str] | None = None) -> str:
        values = {**self.args(), **(overrides or {})}
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)

    def workdir(self) -> str:
        dirs = [args for word, args in self.instructions if word == "WORKDIR"]
        return dirs[-1] if dirs else "/"


def dockerignore_allows(path: str) -> bool:
    """Whether the context keeps `path`: the file excludes everything and re-includes what is built."""
    allowed = [line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    return any(path == a or path.startswith(a + "/") for a in allowed)


def dockerfile_problems(text: str) -> list[str]:
    problems: list[str] = []
    df = Dockerfile.parse(text)
    args = df.args()
    variant_default = args.get("VARIANT")
    if variant_default not in ("cpu", "gpu"):
        problems.append(f"ARG VARIANT must default to cpu or gpu, got {variant_default!r}")
    froms = [args_ for word, args_ in df.instructions if word == "FROM"]
    if len(froms) != 1:
        problems.append(f"expected one FROM, found {len(froms)}")
    for variant in ("cpu", "gpu"):
        for base in froms:
            image = df.expand(base, {"VARIANT": variant})
            match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu)", image)
            if not match:
                problems.append(f"FROM {image}: expected rayproject/ray:<ray>-py<python>-{variant}")
                continue
            ray_version, major, minor, _ = match.groups()
            if ray_version != pinned("ray"):
                problems.append(f"FROM {image}: Ray {ray_version}, constraints.txt pins {pinned('ray')}")
            if f"{major}.{minor}" != project_python():
                problems.append(f"FROM {image}: Python {major}.{minor}, pyproject requires {project_python()}")
    copied: list[str] = []
    for word, args_ in df.instructions:
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args_) if not p.startswith("--")]
            if any(p.startswith("--from") for p in shlex.split(args_)):
                continue
            for src in parts[:-1]:
                if not (REPO / src).exists():
                    problems.append(f"{word} {src}: no such file in the build context (the repository root)")
                elif not dockerignore_allows(src.rstrip("/")):
                    problems.append(f"{word} {src}: excluded by {DOCKERIGNORE.name}")
                copied.append(src.rstrip("/"))
        if word == "RUN" and "pip install" in args_:
            if not re.search(r"(-c|--constraint)\s+constraints\.txt", args_):
                problems.append(f"RUN pip install without -c constraints.txt: {args_[:80]}...")
            if "constraints.txt" not in copied:
                problems.append("RUN pip install before constraints.txt is copied in")
        if word in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", args_) or [args_.split()[0]]:
                if SECRET_LIKE.search(name):
                    problems.append(f"{word} {name}: secrets must not be baked into the image")
    for needed in ("pyproject.toml", "constraints.txt", "mvit", "pipelines", "configs"):
        if needed not in copied:
            problems.append(f"{needed} is not copied into the image")
    problems += [f"Dockerfile: {c}" for c in literal_credentials(text)]
    return problems


def image_home() -> str:
    return Dockerfile.parse(DOCKERFILE.read_text()).workdir()


def test_dockerfile_is_consistent_with_the_repo():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []
    # The image's project checkout is where the Kubernetes entrypoints look for configs.
    assert image_home() == "/home/ray/mvit"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t.replace("COPY --chown=ray:users configs ./configs", "COPY --chown=ray:users confs ./confs"), "confs: no such file"),
        (lambda t: t.replace("pip install --no-cache-dir -c constraints.txt $extra", "pip install --no-cache-dir $extra"), "without -c constraints.txt"),
        (lambda t: t.replace("COPY --chown=ray:users README.md ./", "COPY --chown=ray:users Makefile ./"), "Makefile: excluded by"),
        (lambda t: t.replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0"), "constraints.txt pins"),
        (lambda t: t.replace("ENV PYTHONUNBUFFERED=1", "ENV AWS_SECRET_ACCESS_KEY=abc PYTHONUNBUFFERED=1"), "must not be baked"),
        (lambda t: t.replace("-py311-", "-py310-"), "pyproject requires 3.11"),
    ],
)
def test_dockerfile_validator_rejects_broken_copies(mutate, expected):
    text = DOCKERFILE.read_text()
    mutated = mutate(text)
    assert mutated != text, "the mutation did not apply: update this test with the Dockerfile"
    problems = dockerfile_problems(mutated)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------
# Entrypoints: the real CLI parses them and loads their config (--print-config: no side effects)
# ---------------------------------------------------------------------------------------------------
def mvit_subcommands(parser: argparse.ArgumentParser) -> list[str]:
    # argparse has no public accessor for a parser's subcommands; its subparsers action holds them.
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices) if actions else []


def run_cli_print_config(command: str) -> tuple[str, dict | None, list[str]]:
    """(subcommand, effective config, problems) of a `mvit ...` command line as a cluster would run it,
    with the image's checkout path mapped onto this repository."""
    from pipelines.cli import build_parser, main

    argv = shlex.split(command)
    if not argv or argv[0] != "mvit":
        return "", None, [f"'{command[:60]}' does not run the mvit CLI"]
    subcommands = mvit_subcommands(build_parser())
    if len(argv) < 2 or argv[1] not in subcommands:
        return "", None, [f"'mvit {argv[1] if len(argv) > 1 else ''}' is not a subcommand of this repo ({', '.join(subcommands)})"]
    sub, args = argv[1], argv[2:]
    if sub not in STAGE_CONFIGS:
        return sub, None, []
    home = image_home().rstrip("/") + "/"
    mapped = []
    for arg in args:
        if arg.endswith((".yaml", ".yml")) and "=" not in arg:
            if not arg.startswith(home):
                return sub, None, [f"config {arg} is not inside the image's checkout {home}"]
            arg = str(REPO / arg[len(home):])
            if not Path(arg).is_file():
                return sub, None, [f"config {arg} does not exist in this repo"]
        mapped.append(arg)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([sub, *mapped, "--print-config"])
    if rc != 0:
        return sub, None, [f"mvit {sub} rejects its arguments (exit {rc}): {err.getvalue().strip()}"]
    text = out.getvalue()
    header = f"# effective {sub} config\n"
    assert header in text, text
    return sub, yaml.safe_load(text.split(header, 1)[1]), []


# ---------------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------------
# Field lists of the ray.io/v1 CRDs, in our words. Source: ray-project/kuberay,
# ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go (the Go types the CRDs
# ray-operator/config/crd/bases/ray.io_rayclusters.yaml / ray.io_rayjobs.yaml are generated from);
# "required" = a field without omitempty, as the generated openAPIV3Schema lists it (e.g. the v1
# workerGroupSpecs item requires groupName, maxReplicas, minReplicas, rayStartParams, template, and
# spec requires headGroupSpec). Newer operators made rayStartParams optional; we keep it, which every
# version accepts.
RAYCLUSTER_SPEC_KEYS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
RAYCLUSTER_SPEC_REQUIRED = {"headGroupSpec"}
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP_KEYS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
AUTOSCALER_OPTION_KEYS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
    "env", "envFrom", "volumeMounts",
}
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RUNTIME_IMAGE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)*mvit-runtime:(?P<version>\d+\.\d+\.\d+)-(?P<variant>cpu|gpu)$")


def cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclasses.dataclass
class Group:
    name: str
    max_pods: int
    cpus: float
    gpus: int


def pod_problems(template: dict, where: str, configmaps: set[str]) -> tuple[list[str], float, int]:
    """Problems of a pod template, and the CPU / GPU limits of its Ray container (the first one)."""
    problems: list[str] = []
    containers = ((template or {}).get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}: template.spec.containers is required (a non-empty list)"], 0.0, 0
    ray_container = containers[0]  # KubeRay runs Ray in the first container
    cpus, gpus = 0.0, 0
    for container in containers:
        name = container.get("name")
        if not name:
            problems.append(f"{where}: a container has no name")
        image = container.get("image", "")
        match = RUNTIME_IMAGE.match(image)
        limits = (container.get("resources") or {}).get("limits") or {}
        requests = (container.get("resources") or {}).get("requests") or {}
        gpu = int(limits.get("nvidia.com/gpu", 0))
        if "nvidia.com/gpu" in requests and str(requests["nvidia.com/gpu"]) != str(limits.get("nvidia.com/gpu")):
            problems.append(f"{where}/{name}: nvidia.com/gpu requests must equal limits")
        if not match:
            problems.append(f"{where}/{name}: image {image!r} is not the runtime image (mvit-runtime:<version>-cpu|gpu)")
        else:
            if match["version"] != project_version():
                problems.append(f"{where}/{name}: image version {match['version']} != project version {project_version()}")
            if (match["variant"] == "gpu") != (gpu > 0):
                problems.append(f"{where}/{name}: image variant {match['variant']} with {gpu} GPU(s) requested")
        for env in container.get("env") or []:
            if SECRET_LIKE.search(env.get("name", "")) and "value" in env:
                problems.append(f"{where}/{name}: env {env['name']} has a literal value; use valueFrom.secretKeyRef")
        if container is ray_container:
            cpus = cpu_quantity(limits.get("cpu", 0))
            gpus = gpu
            sources = container.get("envFrom") or []
            secret_refs = {(s.get("secretRef") or {}).get("name") for s in sources} - {None}
            secret_keys = {
                ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") for e in container.get("env") or []
            } - {None}
            if SECRET_NAME not in secret_refs | secret_keys:
                problems.append(f"{where}/{name}: object-storage credentials must come from Secret {SECRET_NAME} (envFrom/secretKeyRef)")
            config_refs = {(s.get("configMapRef") or {}).get("name") for s in sources} - {None}
            if not config_refs:
                problems.append(f"{where}/{name}: no configMapRef: the MLflow URI comes from a ConfigMap")
            for ref in config_refs - configmaps:
                problems.append(f"{where}/{name}: ConfigMap {ref} is not defined under infra/k8s")
            if cpus <= 0:
                problems.append(f"{where}/{name}: no CPU limit (Ray sizes the node from it)")
    return problems, cpus, gpus


def start_params_problems(params, where: str) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams must be a mapping"]
    return [f"{where}.rayStartParams.{k} must be a string (map[string]string), got {v!r}" for k, v in params.items() if not isinstance(v, str)]


def cluster_spec_problems(spec: dict, where: str, configmaps: set[str]) -> tuple[list[str], list[Group]]:
    problems: list[str] = []
    groups: list[Group] = []
    if not isinstance(spec, dict):
        return [f"{where} must be a mapping"], groups
    problems += [f"{where}.{k}: not a field of RayClusterSpec" for k in sorted(set(spec) - RAYCLUSTER_SPEC_KEYS)]
    problems += [f"{where}.{k} is required" for k in sorted(RAYCLUSTER_SPEC_REQUIRED - set(spec))]
    if spec.get("rayVersion") != pinned("ray"):
        problems.append(f"{where}.rayVersion {spec.get('rayVersion')!r} != the pinned Ray {pinned('ray')}")
    options = spec.get("autoscalerOptions") or {}
    problems += [f"{where}.autoscalerOptions.{k}: not a field" for k in sorted(set(options) - AUTOSCALER_OPTION_KEYS)]
    if "upscalingMode" in options and options["upscalingMode"] not in UPSCALING_MODES:
        problems.append(f"{where}.autoscalerOptions.upscalingMode must be one of {sorted(UPSCALING_MODES)}")
    head = spec.get("headGroupSpec") or {}
    problems += [f"{where}.headGroupSpec.{k}: not a field" for k in sorted(set(head) - HEAD_GROUP_KEYS)]
    problems += [f"{where}.headGroupSpec.{k} is required" for k in sorted(HEAD_GROUP_REQUIRED - set(head))]
    problems += start_params_problems(head.get("rayStartParams", {}), f"{where}.headGroupSpec")
    head_problems, _, head_gpus = pod_problems(head.get("template"), f"{where}.headGroupSpec", configmaps)
    problems += head_problems
    if head_gpus:
        problems.append(f"{where}.headGroupSpec: the head requests GPUs; it only schedules")
    names = set()
    for index, group in enumerate(spec.get("workerGroupSpecs") or []):
        gwhere = f"{where}.workerGroupSpecs[{group.get('groupName', index)}]"
        problems += [f"{gwhere}.{k}: not a field" for k in sorted(set(group) - WORKER_GROUP_KEYS)]
        problems += [f"{gwhere}.{k} is required" for k in sorted(WORKER_GROUP_REQUIRED - set(group))]
        if group.get("groupName") in names:
            problems.append(f"{gwhere}: duplicate groupName")
        names.add(group.get("groupName"))
        counts = {k: group.get(k) for k in ("minReplicas", "replicas", "maxReplicas") if k in group}
        if not all(isinstance(v, int) and v >= 0 for v in counts.values()):
            problems.append(f"{gwhere}: replica counts must be non-negative integers, got {counts}")
        elif counts.get("minReplicas", 0) > counts.get("maxReplicas", 0) or not (
            counts.get("minReplicas", 0) <= counts.get("replicas", counts.get("minReplicas", 0)) <= counts.get("maxReplicas", 0)
        ):
            problems.append(f"{gwhere}: need minReplicas <= replicas <= maxReplicas, got {counts}")
        problems += start_params_problems(group.get("rayStartParams", {}), gwhere)
        pod, cpus, gpus = pod_problems(group.get("template"), gwhere, configmaps)
        problems += pod
        max_pods = group.get("maxReplicas") if isinstance(group.get("maxReplicas"), int) else 0
        groups.append(Group(str(group.get("groupName")), max_pods, cpus, gpus))
    return problems, groups


def capacity_problems(sub: str, cfg: dict, groups: list[Group], where: str) -> list[str]:
    """The job's config fits the cluster it runs on."""
    problems = []
    if sub == "train":
        workers, cpus_each = cfg["num_workers"], cfg["cpus_per_worker"]
        pool = [g for g in groups if (g.gpus > 0) == cfg["use_gpu"]]
        slots = sum(g.max_pods * (g.gpus if cfg["use_gpu"] else int(g.cpus // cpus_each)) for g in pool)
        if slots < workers:
            problems.append(f"{where}: train.num_workers={workers} but the worker groups hold at most {slots} such workers")
        if cfg["use_gpu"] and any(g.cpus < g.gpus * cpus_each for g in pool):
            problems.append(f"{where}: a GPU pod has fewer CPUs than {cpus_each} per GPU worker")
    if sub == "preprocess":
        cpu_pool = [g for g in groups if g.gpus == 0 and g.cpus >= cfg["cpus_per_task"]]
        if not cpu_pool:
            problems.append(f"{where}: no CPU worker group with {cfg['cpus_per_task']} CPU(s) for preprocessing tasks")
    return problems


def load_k8s() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def defined_configmaps(manifests: dict[str, list[dict]]) -> set[str]:
    return {d["metadata"]["name"] for docs in manifests.values() for d in docs if d.get("kind") == "ConfigMap"}


def kuberay_problems(doc: dict, where: str, configmaps: set[str]) -> list[str]:
    problems: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{where}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "")
    if not DNS_LABEL.match(name) or len(name) > 63:
        problems.append(f"{where}: metadata.name {name!r} is not a DNS-1123 label")
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        problems += cluster_spec_problems(spec, f"{where}.spec", configmaps)[0]
    elif kind == "RayJob":
        problems += [f"{where}.spec.{k}: not a field of RayJobSpec" for k in sorted(set(spec) - RAYJOB_SPEC_KEYS)]
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            problems.append(f"{where}.spec.submissionMode must be one of {sorted(SUBMISSION_MODES)}")
        if "rayClusterSpec" not in spec:
            problems.append(f"{where}.spec.rayClusterSpec is required here: the job brings its own cluster")
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append(f"{where}.spec.shutdownAfterJobFinishes must be true (no idle GPU clusters left behind)")
        cluster_problems, groups = cluster_spec_problems(spec.get("rayClusterSpec"), f"{where}.spec.rayClusterSpec", configmaps)
        problems += cluster_problems
        entrypoint = spec.get("entrypoint", "")
        if not entrypoint:
            problems.append(f"{where}.spec.entrypoint is required")
        else:
            sub, cfg, cli_problems = run_cli_print_config(entrypoint)
            problems += [f"{where}.spec.entrypoint: {p}" for p in cli_problems]
            if cfg is not None:
                if (cfg.get("ray") or {}).get("address") != "auto":
                    problems.append(f"{where}.spec.entrypoint: pass ray.address=auto so the job joins its cluster")
                problems += capacity_problems(sub, cfg, groups, where)
    else:
        problems.append(f"{where}: kind must be RayCluster or RayJob, got {kind!r}")
    return problems


def ray_docs(manifests: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    return [(f"{name}#{i}", d) for name, docs in manifests.items() for i, d in enumerate(docs) if str(d.get("apiVersion", "")).startswith("ray.io")]


def test_kuberay_manifests_match_the_crds_and_the_repo():
    manifests = load_k8s()
    docs = ray_docs(manifests)
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["RayCluster", "RayJob", "RayJob"], kinds
    configmaps = defined_configmaps(manifests)
    for where, doc in docs:
        assert kuberay_problems(doc, where, configmaps) == [], where
    # One RayJob per heavy stage, each running the real CLI.
    stages = sorted(shlex.split(d["spec"]["entrypoint"])[1] for _, d in docs if d["kind"] == "RayJob")
    assert stages == ["preprocess", "train"]
    # The standalone cluster has a GPU group and a CPU group.
    cluster = next(d for _, d in docs if d["kind"] == "RayCluster")
    _, groups = cluster_spec_problems(cluster["spec"], "raycluster", configmaps)
    assert any(g.gpus > 0 for g in groups) and any(g.gpus == 0 for g in groups)


def test_k8s_settings_hold_the_mlflow_uri_and_no_secrets():
    manifests = load_k8s()
    configmaps = [d for docs in manifests.values() for d in docs if d.get("kind") == "ConfigMap"]
    assert [c["metadata"]["name"] for c in configmaps] == ["mvit-settings"]
    data = configmaps[0]["data"]
    assert urlsplit(data["MLFLOW_TRACKING_URI"]).scheme in ("http", "https")
    assert not [k for k in data if SECRET_LIKE.search(k)], "credentials belong in the Secret, not the ConfigMap"
    # No committed Secret with data: the Secret is created by hand (see settings.yaml).
    assert not [d for docs in manifests.values() for d in docs if d.get("kind") == "Secret"]
    for path in K8S.glob("*.yaml"):
        assert literal_credentials(path.read_text()) == [], path


def _train_job() -> dict:
    return next(d for _, d in ray_docs(load_k8s()) if d["kind"] == "RayJob" and " train " in d["spec"]["entrypoint"])


def _mutations():
    def gpu_group(doc):
        return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]

    def container(doc):
        return gpu_group(doc)["template"]["spec"]["containers"][0]

    return [
        ("apiVersion", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion must be ray.io/v1"),
        ("unknown spec field", lambda d: d["spec"].update(entryPoint="x"), "entryPoint: not a field of RayJobSpec"),
        ("missing template", lambda d: gpu_group(d).pop("template"), "template is required"),
        ("missing maxReplicas", lambda d: gpu_group(d).pop("maxReplicas"), "maxReplicas is required"),
        ("int start param", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "must be a string"),
        ("foreign image", lambda d: container(d).update(image="python:3.11"), "is not the runtime image"),
        ("cpu image on gpu", lambda d: container(d).update(image="mvit-runtime:0.1.0-cpu"), "image variant cpu with 1 GPU"),
        ("no secret", lambda d: container(d).update(envFrom=[{"configMapRef": {"name": "mvit-settings"}}]), "Secret mvit-s3"),
        ("unknown configmap", lambda d: container(d).update(envFrom=[{"secretRef": {"name": "mvit-s3"}}, {"configMapRef": {"name": "nope"}}]), "ConfigMap nope is not defined"),
        ("literal secret env", lambda d: container(d).update(env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]), "literal value"),
        ("not mvit", lambda d: d["spec"].update(entrypoint="python train.py"), "does not run the mvit CLI"),
        ("unknown subcommand", lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace("mvit train", "mvit fit")), "'mvit fit' is not a subcommand"),
        ("missing config", lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace("kinetics400_mvit_b_16x4", "nope")), "does not exist in this repo"),
        ("bad override", lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " epoch=3"), "unknown config key 'epoch'"),
        ("too few GPUs", lambda d: gpu_group(d).update(replicas=4, minReplicas=4, maxReplicas=4), "hold at most 4"),
        ("no shutdown", lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes must be true"),
        ("ray version", lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.9.0"), "!= the pinned Ray"),
    ]


@pytest.mark.parametrize("label, mutate, expected", _mutations(), ids=[m[0] for m in _mutations()])
def test_kuberay_validator_rejects_broken_copies(label, mutate, expected):
    doc = copy.deepcopy(_train_job())
    configmaps = defined_configmaps(load_k8s())
    assert kuberay_problems(doc, "rayjob-train", configmaps) == []
    mutate(doc)
    problems = kuberay_problems(doc, "rayjob-train", configmaps)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)
# ---------------------------------------------------------------------------------------------------
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_problems(cfg: dict, text: str = "") -> list[str]:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [f"ray-schema: {'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in validator.iter_errors(cfg)]
    if problems:
        return problems
    # What `ray up` does before touching AWS: fill in the provider defaults, then validate again
    # (e.g. head_node_type must be a node type, min_workers must fit in max_workers).
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as exc:  # noqa: BLE001 - any rejection is the finding
        problems.append(f"ray prepare/validate_config: {type(exc).__name__}: {exc}")
    types = cfg.get("available_node_types", {})
    workers = {k: v for k, v in types.items() if k != cfg.get("head_node_type")}
    gpu_types = {k: v for k, v in workers.items() if v.get("resources", {}).get("GPU", 0) > 0}
    cpu_types = {k: v for k, v in workers.items() if v.get("resources", {}).get("GPU", 0) == 0}
    if not gpu_types:
        problems.append("no GPU worker type")
    if not cpu_types:
        problems.append("no CPU worker type for preprocessing")
    if any(t.get("max_workers", 0) <= t.get("min_workers", 0) for t in workers.values()):
        problems.append("every worker type must autoscale (max_workers > min_workers)")
    docker = cfg.get("docker", {})
    images = [docker.get(k) for k in ("image", "head_image", "worker_image") if docker.get(k)]
    images += [t.get("docker", {}).get("worker_image") for t in types.values() if t.get("docker", {}).get("worker_image")]
    for image in images:
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu)", image)
        runtime = RUNTIME_IMAGE.match(image)
        if runtime:  # the image infra/Dockerfile builds, pushed somewhere
            if runtime["version"] != project_version():
                problems.append(f"docker image {image}: version != project version {project_version()}")
        elif not match:
            problems.append(f"docker image {image}: expected rayproject/ray:<pinned ray>-py<python>-cpu|gpu or the runtime image")
        elif match.group(1) != pinned("ray") or f"{match.group(2)}.{match.group(3)}" != project_python():
            problems.append(f"docker image {image}: needs Ray {pinned('ray')} on Python {project_python()}")
    for name, t in gpu_types.items():
        image = t.get("docker", {}).get("worker_image") or docker.get("worker_image") or docker.get("image", "")
        if not image.endswith("-gpu"):
            problems.append(f"GPU node type {name} runs the non-GPU image {image}")
    # The repository is mounted and installed with the pinned set on every node.
    mounts = cfg.get("file_mounts", {})
    repo_targets = [remote for remote, local in mounts.items() if (REPO / local).resolve() == REPO]
    for remote, local in mounts.items():
        if not (REPO / local).exists():
            problems.append(f"file_mounts {remote}: {local} does not exist (paths are relative to the repository root)")
    installs = list(cfg.get("head_setup_commands", [])) + list(cfg.get("setup_commands", []))
    installs += [c for t in workers.values() for c in t.get("worker_setup_commands", [])]
    pip = [c for c in installs if "pip install" in c]
    if not pip:
        problems.append("no setup command installs the project")
    for command in pip:
        if not any(f"-c {target}/constraints.txt" in command for target in repo_targets):
            problems.append(f"setup command does not install with the mounted constraints.txt: {command}")
    for name, t in workers.items():
        if "worker_setup_commands" not in t and not any("pip install" in c for c in cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", [])):
            problems.append(f"worker type {name}: nothing installs the project on it")
    # The training recipe fits the GPU workers.
    train = config_class("train")
    from pipelines.config import load_config

    recipe = load_config(train, REPO / "configs" / "kinetics400_mvit_b_16x4.yaml", ["dataset=s3://x/y"], section="train")
    gpus = sum(t.get("max_workers", 0) * t["resources"]["GPU"] for t in gpu_types.values())
    if gpus < recipe.num_workers:
        problems.append(f"GPU worker types hold {gpus} GPUs, the training recipe needs {recipe.num_workers}")
    for name, t in gpu_types.items():
        if t["resources"].get("CPU", 0) < t["resources"]["GPU"] * recipe.cpus_per_worker:
            problems.append(f"{name}: fewer CPUs than {recipe.cpus_per_worker} per GPU worker")
    problems += [f"launcher: {c}" for c in literal_credentials(text)]
    return problems


def test_launcher_yaml_passes_rays_schema_and_fits_the_recipe():
    text = LAUNCHER.read_text()
    cfg = yaml.safe_load(text)
    assert launcher_problems(cfg, text) == []
    assert cfg["provider"]["type"] == "aws"
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("GPU", 0) == 0, "the head is a CPU node"


def test_launcher_accepts_the_pushed_runtime_image_as_documented():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    version = project_version()
    cfg["docker"].update(head_image=f"ghcr.io/you/mvit-runtime:{version}-cpu", worker_image=f"ghcr.io/you/mvit-runtime:{version}-cpu")
    cfg["available_node_types"]["worker.gpu"]["docker"]["worker_image"] = f"ghcr.io/you/mvit-runtime:{version}-gpu"
    assert launcher_problems(cfg) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(workers=3), "ray-schema: <top>: Additional properties"),
        (lambda c: c["available_node_types"]["worker.gpu"].update(min_workers="2"), "is not of type 'integer'"),
        (lambda c: c["available_node_types"]["worker.gpu"].pop("node_config"), "'node_config' is a required property"),
        (lambda c: c.update(head_node_type="head.gpu"), "head_node_type` must be one of"),
        (lambda c: c["available_node_types"]["worker.gpu"].update(min_workers=20), "smaller than the sum of `min_workers`"),
        (lambda c: c["docker"].update(head_image="rayproject/ray:2.9.0-py311-cpu"), "needs Ray"),
        (lambda c: c["available_node_types"]["worker.gpu"].update(max_workers=1), "the training recipe needs 8"),
        (lambda c: c["available_node_types"]["worker.gpu"].update(worker_setup_commands=["pip install -e ~/mvit"]), "mounted constraints.txt"),
        (lambda c: c.update(file_mounts={"~/mvit": "./no-such-dir"}), "does not exist"),
        (lambda c: c["available_node_types"].pop("worker.cpu"), "no CPU worker type"),
        (lambda c: c["available_node_types"]["worker.gpu"].pop("docker"), "runs the non-GPU image"),
        (lambda c: c["docker"].update(head_image="python:3.11-slim"), "expected rayproject/ray"),
    ],
)
def test_launcher_validator_rejects_broken_copies(mutate, expected):
    cfg = yaml.safe_load(LAUNCHER.read_text())
    mutate(cfg)
    problems = launcher_problems(cfg)
    assert any(expected in p for p in problems), problems


def test_credential_scan_finds_literal_keys():
    assert literal_credentials("AWS_SECRET_ACCESS_KEY: hunter2\n")
    assert literal_credentials("key: AKIAABCDEFGHIJKLMNOP\n")
    assert literal_credentials("POSTGRES_PASSWORD=abc\n")
    assert not literal_credentials("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}\nMINIO_ROOT_PASSWORD=\n")


# ---------------------------------------------------------------------------------------------------
# Compose: the local stack
# ---------------------------------------------------------------------------------------------------
COMPOSE_TOP_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets"}
INTERPOLATION = re.compile(r"^\$\{\w+(:?[-?][^}]*)?\}$")


def command_text(service: dict) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key, [])
        parts += value if isinstance(value, list) else [value]
    return " ".join(str(p) for p in parts).replace("$$", "$")


def option(text: str, name: str) -> str | None:
    match = re.search(rf"{name}[ =]+\"?([^\"\s]+)\"?", text)
    return match.group(1) if match else None


def compose_problems(doc: dict) -> list[str]:
    from pipelines import stack

    problems: list[str] = []
    problems += [f"top-level key {k!r} is not part of the compose spec" for k in set(doc) - COMPOSE_TOP_KEYS if not k.startswith("x-")]
    services: dict = doc.get("services") or {}
    volumes = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        image = svc.get("image", "")
        if not image and "build" not in svc:
            problems.append(f"{name}: neither image nor build")
        if image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            problems.append(f"{name}: image {image} is not pinned to a version")
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else (str(port).split(":")[0] if str(port).count(":") == 2 else None)
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: port {port} is not bound to 127.0.0.1")
        depends = svc.get("depends_on", {})
        for dep, spec in (depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)):
            if dep not in services:
                problems.append(f"{name}: depends_on {dep}, which is not a service")
            elif (spec or {}).get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy but {dep} has no healthcheck")
        for mount in svc.get("volumes", []):
            source = str(mount).split(":")[0] if not isinstance(mount, dict) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~")) and source not in volumes:
                problems.append(f"{name}: volume {source} is not declared under volumes")
        environment = svc.get("environment", {})
        items = environment.items() if isinstance(environment, dict) else (e.split("=", 1) for e in environment)
        for key, value in items:
            if SECRET_LIKE.search(key) and not INTERPOLATION.match(str(value)):
                problems.append(f"{name}: {key} must come from the environment (${{VAR}}), not a literal")

    def find(predicate) -> list[str]:
        return [n for n, s in services.items() if predicate(s)]

    s3 = find(lambda s: "minio" in s.get("image", "") and "server" in command_text(s))
    postgres = find(lambda s: s.get("image", "").startswith("postgres"))
    mlflow = find(lambda s: "mlflow" in s.get("image", "") or "mlflow server" in command_text(s))
    buckets_job = find(lambda s: "mc mb" in command_text(s))
    if len(s3) != 1 or len(postgres) != 1 or len(mlflow) != 1 or len(buckets_job) != 1:
        return problems + [f"expected one S3, Postgres, MLflow and bucket-creation service, found {s3}, {postgres}, {mlflow}, {buckets_job}"]
    s3_svc, pg_svc, ml_svc, mk_svc = (services[n[0]] for n in (s3, postgres, mlflow, buckets_job))
    s3_port = int((option(command_text(s3_svc), "--address") or ":9000").rsplit(":", 1)[1])
    created = set(re.findall(r"\w+/([a-z0-9][a-z0-9.-]+)", command_text(mk_svc).split("mc mb", 1)[1]))
    alias_url = re.search(r"mc alias set \S+ (\S+)", command_text(mk_svc))
    if not alias_url or urlsplit(alias_url.group(1)).hostname != s3[0] or urlsplit(alias_url.group(1)).port != s3_port:
        problems.append(f"{buckets_job[0]}: does not talk to the S3 service {s3[0]}:{s3_port}")
    for bucket in (stack.DATA_BUCKET, stack.ARTIFACT_BUCKET):
        if bucket not in created:
            problems.append(f"{buckets_job[0]}: bucket {bucket} (used by pipelines.stack) is not created")
    ml_cmd = command_text(ml_svc)
    backend = urlsplit(option(ml_cmd, "--backend-store-uri") or "")
    if not backend.scheme.startswith("postgresql") or backend.hostname != postgres[0] or (backend.port or 5432) != 5432:
        problems.append(f"{mlflow[0]}: backend store {backend.geturl()!r} is not the Postgres service {postgres[0]}")
    pg_env = pg_svc.get("environment", {})
    if backend.username != pg_env.get("POSTGRES_USER") or backend.path.lstrip("/") != pg_env.get("POSTGRES_DB"):
        problems.append(f"{mlflow[0]}: backend user/database do not match {postgres[0]}'s POSTGRES_USER/POSTGRES_DB")
    artifacts = urlsplit(option(ml_cmd, "--artifacts-destination") or option(ml_cmd, "--default-artifact-root") or "")
    if artifacts.scheme != "s3" or artifacts.hostname not in created:
        problems.append(f"{mlflow[0]}: artifacts {artifacts.geturl()!r} are not in a bucket the stack creates ({sorted(created)})")
    endpoint = urlsplit(str(ml_svc.get("environment", {}).get("MLFLOW_S3_ENDPOINT_URL", "")))
    if endpoint.hostname != s3[0] or endpoint.port != s3_port:
        problems.append(f"{mlflow[0]}: MLFLOW_S3_ENDPOINT_URL {endpoint.geturl()!r} is not the S3 service {s3[0]}:{s3_port}")
    version = re.search(r":v?(\d+\.\d+\.\d+)", ml_svc.get("image", ""))
    if not version or version.group(1) != pinned("mlflow"):
        problems.append(f"{mlflow[0]}: server image {ml_svc.get('image')} is not the pinned MLflow {pinned('mlflow')}")
    for dep in (postgres[0], buckets_job[0]):
        if dep not in (ml_svc.get("depends_on") or {}):
            problems.append(f"{mlflow[0]}: does not wait for {dep}")
    return problems


def test_compose_stack_is_consistent():
    doc = yaml.safe_load(COMPOSE.read_text())
    assert compose_problems(doc) == []
    assert set(doc["services"]) == {"s3", "create-buckets", "postgres", "mlflow"}
    assert literal_credentials(COMPOSE.read_text()) == []
    # The secrets the compose file needs are exactly the ones the example env file lists.
    needed = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    example = {line.split("=")[0] for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert needed == example
    assert ".env" in (INFRA / ".gitignore").read_text().split()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["services"]["mlflow"]["ports"].__setitem__(0, "5000:5000"), "not bound to 127.0.0.1"),
        (lambda d: d["services"]["s3"]["ports"].__setitem__(0, "0.0.0.0:9000:9000"), "not bound to 127.0.0.1"),
        (lambda d: d["services"].update(db=d["services"].pop("postgres")), "not the Postgres service"),
        (lambda d: d["services"]["mlflow"]["environment"].update(MLFLOW_S3_ENDPOINT_URL="http://minio:9000"), "is not the S3 service"),
        (lambda d: d["services"]["mlflow"]["environment"].update(POSTGRES_PASSWORD="hunter2"), "not a literal"),
        (lambda d: d["services"]["mlflow"].update(image="ghcr.io/mlflow/mlflow:latest"), "not pinned"),
        (lambda d: d["services"]["mlflow"]["depends_on"].update(redis={"condition": "service_started"}), "redis, which is not a service"),
        (lambda d: d["services"]["create-buckets"].update(command=["mc alias set stack http://s3:9000 a b && mc mb stack/mvit"]), "bucket mlflow"),
        (lambda d: d["services"]["postgres"].pop("healthcheck"), "has no healthcheck"),
        (lambda d: d.pop("volumes"), "is not declared"),
    ],
)
def test_compose_validator_rejects_broken_copies(mutate, expected):
    doc = yaml.safe_load(COMPOSE.read_text())
    mutate(doc)
    problems = compose_problems(doc)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------
# Config files named anywhere in infra/ and the README's cluster section exist and load
# ---------------------------------------------------------------------------------------------------
def referenced_configs() -> set[str]:
    texts = [p.read_text() for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", "")]
    readme = (REPO / "README.md").read_text()
    if "## Running on a cluster" in readme:
        texts.append(readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0])
    return {m for t in texts for m in re.findall(r"configs/[\w.-]+\.ya?ml", t)}


def test_every_referenced_config_loads_for_each_of_its_stages():
    from pipelines.config import load_config

    configs = referenced_configs()
    assert "configs/kinetics400_mvit_b_16x4.yaml" in configs
    for rel in sorted(configs):
        path = REPO / rel
        assert path.is_file(), f"{rel} is referenced under infra/ but does not exist"
        sections = yaml.safe_load(path.read_text())
        stages = [s for s in STAGE_CONFIGS if s in sections]
        assert stages, f"{rel} has no stage section"
        for stage in stages:
            cls = config_class(stage)
            # Required keys (data locations) are per deployment: give them placeholders.
            required = [f"{f.name}=placeholder" for f in dataclasses.fields(cls) if f.default is MISSING]
            load_config(cls, path, required, section=stage)


def test_readme_cluster_section_names_files_that_exist():
    readme = (REPO / "README.md").read_text()
    assert "## Running on a cluster" in readme
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\binfra/[\w./-]+\w", section))
    assert {"infra/aws/cluster.yaml", "infra/compose.yaml", "infra/Dockerfile"} <= named, named
    assert any(n.startswith("infra/k8s/") for n in named)
    # infra/.env is made by the recipe itself (and must stay out of git); everything else must exist.
    made_locally = {f"infra/{n}" for n in (INFRA / ".gitignore").read_text().split() if not n.startswith("#")}
    missing = [n for n in named if not (REPO / n).exists() and n not in made_locally]
    assert missing == []
