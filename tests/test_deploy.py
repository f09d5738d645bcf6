"""deploy/: the Kubernetes manifests validated offline against Kubernetes' own
JSON schemas (kubernetes-validate ships them), and the cross-references no
schema sees: labels and selectors, ports and probes, Secret and ConfigMap
names and keys, the container's flags parsed by ``nuclick-bridge serve``'s own
parser, the grace period, and the Dockerfile against the Makefile and the
manifests.  No cluster and no Docker engine are involved: the image is not
built in CI.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from bridge import __version__
from bridge.cli import build_parser
from bridge.service.server import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"


def _need(module: str):
    """kubernetes-validate (and its PyYAML) come with `make test` (make deploy-deps): skip without
    them on a developer's machine, fail in CI."""
    try:
        return __import__(module)
    except ImportError:
        why = f"{module} is missing: run 'make deploy-deps' (make test does)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why, allow_module_level=True)


yaml = _need("yaml")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    out = {}
    for name in ("nuclick.yaml", "secret.example.yaml"):
        for d in docs(name):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


@pytest.mark.parametrize("name", ["nuclick.yaml", "secret.example.yaml"])
def test_manifests_are_valid_kubernetes_objects(name):
    kubernetes_validate = _need("kubernetes_validate")
    found = docs(name)
    assert found
    for d in found:
        # strict: an unknown or misspelt field is an error, as kubectl --validate=strict says
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does see mistakes
        bad = dict(found[0], spec={"replicaz": 2}) if found[0]["kind"] == "Deployment" else dict(found[0], dataa={})
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def _env(configmap: dict, text: str) -> str:
    def sub(m: re.Match) -> str:
        assert m.group(1) in configmap["data"], f"$({m.group(1)}) is not in ConfigMap {configmap['metadata']['name']}"
        return configmap["data"][m.group(1)]

    return re.sub(r"\$\(([A-Z0-9_]+)\)", sub, text)


def test_deployment_services_probes_secret_and_flags_agree(manifests):
    dep = manifests[("Deployment", "nuclick-bridge")]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    # The flags, as `serve` parses them, with the ConfigMap's values filled in.
    (ref,) = c["envFrom"]
    flags = manifests[("ConfigMap", ref["configMapRef"]["name"])]
    args = build_parser().parse_args([_env(flags, a) for a in c["args"]])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert (args.port, args.http_port) == (ports["grpc"], ports["http"])
    assert args.device == "cuda" and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args.workers > args.max_streams  # serve refuses otherwise
    # Kubernetes kills the pod terminationGracePeriodSeconds after SIGTERM: room for --grace, and a little more.
    period = pod["spec"]["terminationGracePeriodSeconds"]
    assert args.grace < period <= args.grace + 15

    # Native gRPC probes on the health service's port; readiness on the NuClick service itself.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == args.port, probe
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME

    # The token file lies in the Secret's volume, under the Secret's key.
    token_dir, token_file = args.token_file.rsplit("/", 1)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == token_dir)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    secret = manifests[("Secret", volume["secret"]["secretName"])]
    (item,) = volume["secret"]["items"]
    assert item["path"] == token_file and item["key"] in secret["stringData"]

    # Prometheus scrapes the HTTP port's /metrics.
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == args.http_port

    # Both Services select these pods; the gRPC one is headless (one DNS address per ready pod).
    grpc_svc, http_svc = manifests[("Service", "nuclick-grpc")], manifests[("Service", "nuclick-http")]
    assert grpc_svc["spec"]["clusterIP"] == "None"
    for svc, name in ((grpc_svc, "grpc"), (http_svc, "http")):
        assert svc["spec"]["selector"].items() <= labels.items()
        (port,) = svc["spec"]["ports"]
        assert port["targetPort"] == name and port["port"] == ports[name]


def test_dockerfile_installs_as_the_readme_and_serves_the_manifest_ports(manifests):
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"^TORCH \?= (\S+)$", makefile, flags=re.M).group(1)
    assert re.search(rf"^ARG TORCH={re.escape(torch)}$", text, flags=re.M)  # the Makefile's torch
    assert 'pip install --index-url "$TORCH_INDEX" "$TORCH"' in text and "pip install . " in text
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        for src in shlex.split(line)[:-1]:
            assert (ROOT / src).exists(), src
    assert re.search(r'^ENTRYPOINT \["nuclick-bridge"\]$', text, flags=re.M)
    cmd = yaml.safe_load(re.search(r"^CMD (.+)$", text, flags=re.M).group(1))
    args = build_parser().parse_args(cmd)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, flags=re.M).group(1).split()}
    c = manifests[("Deployment", "nuclick-bridge")]["spec"]["template"]["spec"]["containers"][0]
    assert exposed == {args.port, args.http_port} == {p["containerPort"] for p in c["ports"]}
    assert re.search(r"^USER (\d+)$", text, flags=re.M).group(1) == str(
        manifests[("Deployment", "nuclick-bridge")]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    )
    assert c["image"].startswith(f"nuclick-bridge:{__version__}")
    page = (ROOT / "docs" / "scale-out.md").read_text()
    assert "# Many users, many GPUs" in page and "not built in CI" in page
