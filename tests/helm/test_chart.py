"""The Helm chart with a real Helm (3 and 4): lint, render, the single-source CRDs and
dashboards, least-privilege RBAC; on a real apiserver: every rendered manifest passes a
server-side dry run, and the operator reconciles a TurnPool with only the chart's
ServiceAccount identity while verbs outside its Role are denied."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.conftest import CHART, ROOT, VALUES, helm_binary
from tests.k8s.conftest import wait_for
from turnstorm.testing.controlplane import ControlPlane

VALUE_IDS = [v.stem for v in VALUES]
RELEASE = "ts"


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(helm), *args], capture_output=True, text=True, check=False,
                            timeout=120, env={**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache",
                                              "HELM_CONFIG_HOME": "/tmp/helm-config",
                                              "HELM_DATA_HOME": "/tmp/helm-data"})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def render(helm: Path, values: Path | None = None, *extra: str,
           namespace: str = "turnstorm", release: str = RELEASE) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace, *extra]
    if values is not None:
        args += ["-f", str(values)]
    out = run_helm(helm, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, [d["metadata"]["name"] for d in by_kind(docs, kind)]
    return found[0]


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


# What the operator calls (turnstorm.operator.kube/reconcile) and what kopf needs.
NAMESPACED_RULES = {
    *{("turnstorm.io", "turnpools", v) for v in ("get", "list", "watch", "patch")},
    ("turnstorm.io", "turnpools/status", "get"), ("turnstorm.io", "turnpools/status", "patch"),
    ("turnstorm.io", "turnpools/finalizers", "update"),
    *{("turnstorm.io", "loadruns", v) for v in ("get", "list", "watch")},
    *{(g, r, v) for g, r in (("", "configmaps"), ("", "services"), ("apps", "deployments"),
                             ("policy", "poddisruptionbudgets"),
                             ("monitoring.coreos.com", "servicemonitors"))
      for v in ("get", "create", "patch")},
    ("", "secrets", "get"), ("", "secrets", "create"),
    ("", "pods", "list"), ("", "pods", "patch"), ("", "pods", "delete"),
    ("", "pods/resize", "patch"),
    ("", "events", "create"), ("", "events", "patch"),
}
CRD_RULES = {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
             ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
NAMESPACE_RULES = {("", "namespaces", "list"), ("", "namespaces", "watch")}


# -- without a cluster ---------------------------------------------------------------------

def test_chart_takes_crds_and_dashboards_from_the_single_sources() -> None:
    for name in ("crds", "dashboards"):
        link = CHART / name
        assert link.is_symlink(), f"charts/turnstorm/{name} must link to {name}/, not copy it"
        assert link.resolve() == (ROOT / name).resolve()


def test_get_helm_is_idempotent_and_prints_the_path_last(helm: Path) -> None:
    version = run_helm(helm, "version", "--template", "{{.Version}}").stdout
    assert helm.parent.name == version
    assert helm.parent.parent.parent.name == "turnstorm"
    major = version[1]
    assert helm_binary(major) == helm  # second run: the cache, same path


@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
def test_lint_is_clean(helm: Path, values: Path) -> None:
    result = run_helm(helm, "lint", str(CHART), "--strict", "-f", str(values))
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
def test_template_renders_valid_objects(helm: Path, values: Path) -> None:
    docs = render(helm, values)
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), keys
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        assert len(doc["metadata"]["name"]) <= 63
    deployment = one(docs, "Deployment", "-operator")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"][:3] == ["operator", "--liveness", "http://0.0.0.0:8080/healthz"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"name": "healthz", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    account = pod["serviceAccountName"]
    bindings = by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
    assert bindings and all(b["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                               "namespace": "turnstorm"}] for b in bindings)
    assert [sa["metadata"]["name"] for sa in by_kind(docs, "ServiceAccount")] == [account]


def test_crds_are_the_repository_files(helm: Path) -> None:
    shown = run_helm(helm, "show", "crds", str(CHART)).stdout
    files = sorted((ROOT / "crds").glob("*.yaml"))
    for path in files:  # byte for byte
        assert path.read_text() in shown, path.name
    rendered = by_kind(render(helm, None, "--include-crds"), "CustomResourceDefinition")
    expected = [yaml.safe_load(p.read_text()) for p in files]
    key = lambda d: d["metadata"]["name"]  # noqa: E731
    assert sorted(rendered, key=key) == sorted(expected, key=key)
    # Not templated: `helm template` without --include-crds leaves them to install time.
    assert not by_kind(render(helm), "CustomResourceDefinition")


def test_dashboards_ship_byte_for_byte_for_the_grafana_sidecar(helm: Path) -> None:
    maps = [d for d in by_kind(render(helm), "ConfigMap")
            if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    shipped = {name: text for cm in maps for name, text in cm["data"].items()}
    files = {p.name: p.read_text() for p in sorted((ROOT / "dashboards").glob("*.json"))}
    assert len(files) >= 3
    assert shipped == files
    other = render(helm, None, "--set", "dashboards.namespace=monitoring",
                   "--set", "dashboards.label=my_dashboards", "--set", "dashboards.enabled=true")
    moved = [d for d in by_kind(other, "ConfigMap") if "my_dashboards" in d["metadata"]["labels"]]
    assert len(moved) == len(files)
    assert {d["metadata"]["namespace"] for d in moved} == {"monitoring"}
    assert not [d for d in by_kind(render(helm, None, "--set", "dashboards.enabled=false"),
                                   "ConfigMap")]


def test_rbac_is_exactly_what_the_operator_uses(helm: Path) -> None:
    docs = render(helm)
    (role,) = by_kind(docs, "ClusterRole")
    # Cluster-wide, kopf never lists namespaces (its namespace observer skips them).
    assert rule_set(role["rules"]) == NAMESPACED_RULES | CRD_RULES
    assert not by_kind(docs, "Role")
    granted = json.dumps([d for d in docs if d["kind"].endswith("Role")])
    assert '"*"' not in granted and "escalate" not in granted
    deletable = {r for _, r, v in rule_set(role["rules"]) if v == "delete"}
    assert deletable == {"pods"}  # a removed relay the ReplicaSet kept


def test_namespaced_mode_uses_a_role_in_that_namespace(helm: Path) -> None:
    docs = render(helm, CHART.parents[1] / "tests" / "helm" / "values" / "namespaced.yaml")
    (cluster_role,) = by_kind(docs, "ClusterRole")
    # Watching one namespace, kopf lists and watches namespaces (it retries for minutes
    # before falling back when it may not).
    assert rule_set(cluster_role["rules"]) == CRD_RULES | NAMESPACE_RULES
    (role,) = by_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "relays"
    assert rule_set(role["rules"]) == NAMESPACED_RULES
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == "relays"
    assert binding["subjects"][0] == {"kind": "ServiceAccount", "name": "relay-operator",
                                      "namespace": "turnstorm"}
    args = one(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0][
        "args"]
    assert args[args.index("--namespace") + 1] == "relays"
    assert args[args.index("--exporter-image") + 1] == "registry.example/turnstorm-exporter:0.1.0"


def test_optional_parts_are_off_by_default_and_on_when_asked(helm: Path) -> None:
    kinds = {d["kind"] for d in render(helm)}
    assert kinds.isdisjoint({"Job", "ServiceMonitor", "PodMonitor", "PrometheusRule"})
    docs = render(helm, CHART.parents[1] / "tests" / "helm" / "values" / "locust.yaml")
    job = one(docs, "Job", "-storm")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "storm"
    assert args[args.index("--peer") + 1] == "10.0.0.60:9000"
    assert args[args.index("--workers") + 1] == "2"
    assert args[args.index("--shape-param") + 1] == "fraction=0.5"
    echo = one(docs, "Service", "-echo")
    assert echo["spec"]["clusterIP"] == "10.0.0.60"
    assert echo["spec"]["ports"][0]["protocol"] == "UDP"
    monitors = render(helm, CHART.parents[1] / "tests" / "helm" / "values" / "monitors.yaml")
    relays = one(monitors, "PodMonitor", "-relays")
    relabel = relays["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_turnstorm_io_pool"],
            "targetLabel": "pool"} in relabel
    assert one(monitors, "ServiceMonitor", "-relays")["metadata"]["labels"][
        "release"] == "kube-prometheus-stack"
    rules = one(monitors, "PrometheusRule")["spec"]
    assert rules == yaml.safe_load((CHART / "rules" / "turnstorm.rules.yaml").read_text())


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "locust.mix=bogus"], "mix"),
    (["--set", "operator.livenessPort=0"], "livenessPort"),
    (["--set", "nosuchkey=1"], "nosuchkey"),
    (["--set", "locust.enabled=true"], "locust.enabled needs locust.targets"),
    (["--set", "locust.enabled=true", "--set", "locust.targets={turn:10.0.0.5:3478}"],
     "needs an echo peer"),
])
def test_bad_values_are_refused_with_a_reason(helm: Path, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_promtool_accepts_the_shipped_rules() -> None:
    rules = sorted((CHART / "rules").glob("*.yaml"))
    assert rules
    result = subprocess.run(["promtool", "check", "rules", *map(str, rules)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- on a real apiserver -------------------------------------------------------------------

def ensure_namespaces(plane: ControlPlane, docs: list[dict[str, Any]]) -> None:
    wanted = {d["metadata"]["namespace"] for d in docs if d["metadata"].get("namespace")}
    for name in sorted(wanted):
        if plane.kubectl("get", "namespace", name, check=False).returncode != 0:
            plane.kubectl("create", "namespace", name)


@pytest.mark.k8s
@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
def test_every_manifest_passes_a_server_side_dry_run(helm: Path, helm_plane: ControlPlane,
                                                      values: Path) -> None:
    docs = render(helm, values, "--include-crds")
    ensure_namespaces(helm_plane, docs)
    text = "".join("---\n" + yaml.safe_dump(d) for d in docs)
    result = helm_plane.kubectl("apply", "--dry-run=server", "-f", "-", input_text=text,
                                check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(docs) and all(line.endswith("(server dry run)") for line in lines)


@pytest.mark.k8s
def test_helm_install_dry_run_against_the_apiserver_prints_next_steps(
        helm: Path, helm_plane: ControlPlane) -> None:
    ensure_namespaces(helm_plane, [{"metadata": {"namespace": "turnstorm"}}])
    out = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", "turnstorm",
                   "--kubeconfig", str(helm_plane.kubeconfig), "--dry-run=server").stdout
    notes = out.split("NOTES:", 1)[1]
    for expected in ("kubectl -n default create secret generic voice-relay-auth",
                     "kind: TurnPool", "kubectl -n default get turnpools -w",
                     "get configmaps -l grafana_dashboard=1",
                     "rollout status deployment/ts-turnstorm-operator"):
        assert expected in notes, expected


def sa_kubeconfig(plane: ControlPlane, namespace: str, account: str, path: Path) -> Path:
    token = plane.kubectl("create", "token", account, "-n", namespace,
                          "--duration=1h").stdout.strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": plane.url,
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": account,
                                                "namespace": namespace}}],
        "current-context": "sa"}))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def operator_as(kubeconfig: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> Iterator[Any]:
    """The operator in-process with kopf's KopfRunner, every client on ``kubeconfig``."""
    import kubernetes.config.kube_config
    from kopf.testing import KopfRunner

    from tests.k8s.test_operator import handlers_registry
    from turnstorm.operator import handlers

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("TURNSTORM_KUBECONFIG", str(kubeconfig))
    # kopf logs in through the kubernetes client, whose default kubeconfig path is read
    # from the environment once, at import.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(kubeconfig))
    handlers._state.clear()  # the handlers' cached Kube client: rebuilt with this identity
    try:
        with KopfRunner(["run", "--standalone", "--verbose", *args],
                        registry=handlers_registry(), timeout=60) as runner:
            yield runner
    finally:
        handlers._state.clear()
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


def can_i(plane: ControlPlane, kubeconfig: Path, *args: str) -> bool:
    result = subprocess.run([plane.kubectl_path, f"--kubeconfig={kubeconfig}", "auth", "can-i",
                             *args], capture_output=True, text=True, check=False, timeout=30)
    return result.stdout.strip() == "yes"


@pytest.mark.k8s
@pytest.mark.parametrize("mode", ["clusterwide", "namespaced"])
def test_operator_reconciles_with_only_the_charts_identity(
        helm_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        mode: str) -> None:
    from tests.k8s.test_operator import create_secret, get, pool_yaml, wait_ready_objects

    helm = helm_binary("3") if mode == "clusterwide" else helm_binary("4")
    system, pools = f"sys-{mode[:4]}", f"pools-{mode[:4]}"
    for name in (system, pools):
        helm_plane.kubectl("create", "namespace", name)
    extra = ["--set", f"operator.watchNamespace={pools}"] if mode == "namespaced" else []
    docs = render(helm, None, *extra, namespace=system, release=f"r{mode[:4]}")
    helm_plane.kubectl("apply", "-f", "-",
                       input_text="".join("---\n" + yaml.safe_dump(d) for d in docs))
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    kubeconfig = sa_kubeconfig(helm_plane, system, account, tmp_path / "sa.kubeconfig")
    # The identity really is the ServiceAccount, and it cannot step outside its Role.
    whoami = subprocess.run([helm_plane.kubectl_path, f"--kubeconfig={kubeconfig}", "auth",
                             "whoami", "-o", "jsonpath={.status.userInfo.username}"],
                            capture_output=True, text=True, check=True).stdout
    assert whoami == f"system:serviceaccount:{system}:{account}"
    assert can_i(helm_plane, kubeconfig, "patch", "deployments", "-n", pools)
    assert can_i(helm_plane, kubeconfig, "patch", "pods", "--subresource=resize", "-n", pools)
    for denied in (["delete", "secrets"], ["create", "pods"], ["delete", "turnpools"],
                   ["delete", "deployments"], ["get", "pods/exec"], ["create", "pods/exec"],
                   ["list", "secrets"], ["update", "deployments"], ["create", "clusterroles"],
                   ["impersonate", "serviceaccounts"]):
        assert not can_i(helm_plane, kubeconfig, *denied, "-n", pools), denied
    if mode == "namespaced":
        assert not can_i(helm_plane, kubeconfig, "patch", "deployments", "-n", "default")
        assert not can_i(helm_plane, kubeconfig, "list", "secrets", "-n", "default")
    else:
        assert not can_i(helm_plane, kubeconfig, "list", "namespaces")

    create_secret(helm_plane, "alpha-auth", pools)
    args = ["--namespace", pools] if mode == "namespaced" else ["--all-namespaces"]
    with operator_as(kubeconfig, monkeypatch, *args) as runner:
        helm_plane.kubectl("apply", "-f", "-", input_text=pool_yaml("alpha", pools))
        objects = wait_ready_objects(helm_plane, "alpha", pools)
        wait_for(lambda: (get(helm_plane, "turnpool", "alpha", pools) or {})
                 .get("status", {}).get("desiredReplicas"), timeout=30, what="pool status")
        # The monitoring CRD is installed here, so the pool's ServiceMonitor is applied too.
        monitor = wait_for(lambda: get(helm_plane, "servicemonitor", "alpha", pools),
                           timeout=30, what="ServiceMonitor")
    assert objects["deployment/alpha"]["spec"]["replicas"] == 2
    assert monitor["metadata"]["ownerReferences"][0]["kind"] == "TurnPool"
    deployment = json.loads(helm_plane.kubectl("get", "deployment", "alpha", "-n", pools, "-o",
                                               "json", "--show-managed-fields").stdout)
    managers = {m["manager"] for m in deployment["metadata"]["managedFields"]}
    assert "turnstorm-operator" in managers
    output = runner.output.lower()
    assert "forbidden" not in output and " 403" not in output, runner.output[-3000:]
