#!/usr/bin/env python3
"""Invariants of the rendered manifests that schemas cannot express.

Usage: invariants.py TARGET RENDERED.yaml HUB_TOML PROXY_CONF
TARGET names the kustomize target (for messages). Prints one line per check and exits 1 if any
failed. Each check states a property a zero-loss, locked-down deployment depends on.
"""

import re
import sys
import tomllib

import yaml


def seconds(text: str) -> float:
    """A humantime duration as the hub reads it ("20s", "1m30s", "250ms")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def nginx_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", text)
    if not match:
        raise ValueError(f"not an nginx time: {text!r}")
    return seconds(match.group(1) + (match.group(2) or "s"))


class Checks:
    def __init__(self, target: str):
        self.target = target
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        if ok:
            self.passed += 1
            print(f"ok   {self.target}: {what}")
        else:
            self.failed += 1
            print(f"FAIL {self.target}: {what}" + (f" ({detail})" if detail else ""))


def containers(pod_spec: dict) -> list:
    return pod_spec.get("containers", []) + pod_spec.get("initContainers", [])


def main() -> int:
    target, rendered, hub_toml, proxy_conf = sys.argv[1:5]
    with open(rendered) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    with open(hub_toml, "rb") as f:
        hub = tomllib.load(f)
    with open(proxy_conf) as f:
        proxy = f.read()
    c = Checks(target)
    by_kind: dict[str, list] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)

    def one(kind: str, name: str) -> dict | None:
        found = [o for o in by_kind.get(kind, []) if o["metadata"]["name"] == name]
        return found[0] if found else None

    namespaces = {o["metadata"].get("namespace") for o in objects}
    c.check(
        len(namespaces) == 1 and None not in namespaces,
        "every object is in the overlay's one namespace",
        str(namespaces),
    )
    namespace = next(iter(namespaces))

    c.check("Secret" not in by_kind, "no Secret is rendered: secrets are created out of band")

    hub_dep = one("Deployment", "hub")
    c.check(hub_dep is not None, "a hub Deployment exists")
    if hub_dep is None:
        return 1
    spec = hub_dep["spec"]
    pod = spec["template"]["spec"]
    hub_c = next(x for x in pod["containers"] if x["name"] == "hub")

    # Zero-loss rollouts.
    strategy = spec.get("strategy", {})
    c.check(
        strategy.get("type") == "RollingUpdate"
        and strategy.get("rollingUpdate", {}).get("maxUnavailable") == 0,
        "hub rollouts never drop below the wanted ready count (maxUnavailable 0)",
    )
    pre_stop = hub_c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain = seconds(hub["shutdown"]["drain_timeout"])
    grace = pod.get("terminationGracePeriodSeconds", 30)
    # After the drain the hub writes its last presence changes (at most twice broker.timeout,
    # 2 s by default) and flushes its OpenTelemetry export (at most 5 s).
    presence = 2 * seconds(hub.get("broker", {}).get("timeout", "2s"))
    flush = 5
    c.check(
        grace > pre_stop + drain + presence + flush,
        "grace period outlasts the preStop sleep, the hub's drain timeout, its last presence "
        "write and its telemetry flush",
        f"{grace} <= {pre_stop} + {drain} + {presence} + {flush}",
    )
    c.check(pre_stop > 0, "a preStop pause lets endpoints update before the hub drains")

    # Probes at the hub's real endpoints and port.
    listen_port = int(hub["listen"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in hub_c.get("ports", [])}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = hub_c.get(probe, {}).get("httpGet", {})
        port = ports.get(get.get("port"), get.get("port"))
        c.check(
            get.get("path") == path and port == listen_port,
            f"{probe} asks {path} on the hub's listen port {listen_port}",
            f"{get}",
        )
    annotations = spec["template"]["metadata"].get("annotations", {})
    c.check(
        annotations.get("prometheus.io/scrape") == "true"
        and annotations.get("prometheus.io/path") == "/metrics"
        and int(annotations.get("prometheus.io/port", 0)) == listen_port,
        "pods carry Prometheus scrape annotations for /metrics",
    )

    # Config from the ConfigMap, secrets from Secrets.
    env = {e["name"]: e for e in hub_c.get("env", [])}
    secret_env = env.get("HUB_AUTH__HS256_SECRET", {})
    c.check(
        "secretKeyRef" in secret_env.get("valueFrom", {}),
        "the JWT key comes from a Secret",
    )
    redis_env = [k for k in ("HUB_BROKER__URL", "HUB_BROKER__CLUSTER_NODES") if k in env]
    c.check(
        len(redis_env) == 1,
        "the hub is told where Redis is: one URL or a cluster's seed nodes, not both",
        ", ".join(redis_env),
    )
    mounts = {m["name"]: m["mountPath"] for m in hub_c.get("volumeMounts", [])}
    config_volume = next((v for v in pod.get("volumes", []) if "configMap" in v), None)
    c.check(
        config_volume is not None
        and mounts.get(config_volume["name"]) is not None
        and f"{mounts[config_volume['name']]}/hub.toml" in hub_c.get("args", []),
        "the hub reads hub.toml from the mounted ConfigMap",
    )

    # Keepalive below every proxy's read timeout.
    ping = seconds(hub["ws"]["ping_interval"])
    read_timeouts = [nginx_seconds(t) for t in re.findall(r"proxy_read_timeout\s+(\S+);", proxy)]
    for ingress in by_kind.get("Ingress", []):
        a = ingress["metadata"].get("annotations", {})
        read_timeouts.append(float(a.get("nginx.ingress.kubernetes.io/proxy-read-timeout", 60)))
    c.check(
        bool(read_timeouts) and all(ping * 2 < t for t in read_timeouts),
        "the hub pings at least twice per proxy read timeout",
        f"ping {ping}s, read timeouts {read_timeouts}",
    )

    # Every container of every workload locked down and bounded.
    for kind in ("Deployment", "StatefulSet"):
        for workload in by_kind.get(kind, []):
            name = workload["metadata"]["name"]
            wspec = workload["spec"]
            tpl = wspec["template"]
            c.check(
                tpl["spec"].get("automountServiceAccountToken") is False,
                f"{kind} {name} mounts no service-account token",
            )
            selector = wspec["selector"]["matchLabels"]
            labels = tpl["metadata"].get("labels", {})
            c.check(
                all(labels.get(k) == v for k, v in selector.items()),
                f"{kind} {name} selects its own pods",
            )
            pod_sc = tpl["spec"].get("securityContext", {})
            for x in containers(tpl["spec"]):
                sc = x.get("securityContext", {})
                limits = x.get("resources", {}).get("limits", {})
                requests = x.get("resources", {}).get("requests", {})
                c.check(
                    {"cpu", "memory"} <= limits.keys() and {"cpu", "memory"} <= requests.keys(),
                    f"{kind} {name}/{x['name']} has cpu and memory requests and limits",
                )
                c.check(
                    (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")) is True
                    and sc.get("allowPrivilegeEscalation") is False
                    and sc.get("readOnlyRootFilesystem") is True
                    and sc.get("capabilities", {}).get("drop") == ["ALL"]
                    and (sc.get("privileged") is not True)
                    and (
                        sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
                        == "RuntimeDefault"
                    ),
                    f"{kind} {name}/{x['name']} runs non-root, read-only, unprivileged, "
                    "no capabilities, seccomp RuntimeDefault",
                    f"{sc}",
                )

    # Services and budgets select real pods.
    pod_labels = [
        w["spec"]["template"]["metadata"].get("labels", {})
        for kind in ("Deployment", "StatefulSet")
        for w in by_kind.get(kind, [])
    ]

    def selects_pods(selector: dict) -> bool:
        return any(all(lbl.get(k) == v for k, v in selector.items()) for lbl in pod_labels)

    for svc in by_kind.get("Service", []):
        c.check(
            selects_pods(svc["spec"].get("selector", {})),
            f"Service {svc['metadata']['name']} selects pods of a workload",
        )
    for pdb in by_kind.get("PodDisruptionBudget", []):
        c.check(
            selects_pods(pdb["spec"]["selector"]["matchLabels"]),
            f"PodDisruptionBudget {pdb['metadata']['name']} covers pods of a workload",
        )
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        c.check(
            one(ref["kind"], ref["name"]) is not None
            and hpa["spec"].get("minReplicas", 1) >= 2,
            f"HPA {hpa['metadata']['name']} scales an existing {ref['kind']} and keeps 2+",
        )

    # The front door finds the hubs of this namespace.
    configmaps = [
        o for o in by_kind.get("ConfigMap", []) if o["metadata"]["name"].startswith("front-door")
    ]
    if configmaps:
        upstreams = configmaps[0]["data"].get("hub-upstreams.conf", "")
        hosts = re.findall(r"server\s+([^\s:;]+)", upstreams)
        headless = one("Service", "hub-pods")
        c.check(
            bool(hosts)
            and all(h == f"hub-pods.{namespace}.svc.cluster.local" for h in hosts)
            and headless is not None
            and headless["spec"].get("clusterIP") == "None"
            and headless["spec"].get("publishNotReadyAddresses") is not True,
            f"the front door resolves ready hub pods of {namespace} through the headless Service",
            f"{hosts}",
        )

    # Only the entry path reaches hubs; only hubs reach Redis.
    policies = by_kind.get("NetworkPolicy", [])
    hub_policies = [
        p
        for p in policies
        if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "hub"
    ]
    c.check(
        bool(hub_policies)
        and all("Ingress" in p["spec"].get("policyTypes", []) for p in hub_policies),
        "a NetworkPolicy restricts who reaches the hubs",
    )
    redis_sts = one("StatefulSet", "redis")
    if redis_sts is not None:
        redis_policies = [
            p
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
            == "redis"
        ]
        sources = [
            peer.get("podSelector", {}).get("matchLabels", {})
            for p in redis_policies
            for rule in p["spec"].get("ingress", [])
            for peer in rule.get("from", [])
        ]
        c.check(
            bool(sources) and all(s == {"app.kubernetes.io/name": "hub"} for s in sources),
            "only hubs may reach Redis",
            f"{sources}",
        )

    for ingress in by_kind.get("Ingress", []):
        a = ingress["metadata"].get("annotations", {})
        c.check(
            a.get("nginx.ingress.kubernetes.io/affinity") == "cookie"
            and float(a.get("nginx.ingress.kubernetes.io/proxy-read-timeout", 0)) >= 3600
            and float(a.get("nginx.ingress.kubernetes.io/proxy-send-timeout", 0)) >= 3600,
            f"Ingress {ingress['metadata']['name']} has cookie affinity and 3600 s timeouts",
        )
    for ingress in by_kind.get("Ingress", []):
        a = ingress["metadata"].get("annotations", {})
        c.check(
            a.get("nginx.ingress.kubernetes.io/enable-access-log") == "false",
            f"Ingress {ingress['metadata']['name']} logs no request line (tokens ride in the query)",
        )
    # The nginx front door: every log line without the query, and the dashboard reachable.
    formats = dict(re.findall(r"log_format\s+(\S+)\s+((?:'[^']*'\s*)+);", proxy))
    logs = re.findall(r"^\s*access_log\s+([^;]+);", proxy, re.M)
    leaky = [n for n, f in formats.items() if re.search(r"\$(request\b|request_uri|args|query_string|arg_token)", f)]
    c.check(
        not leaky and bool(logs) and all(l.strip() == "off" or l.split()[-1] in formats for l in logs),
        "the front door's access log never holds the query string",
        f"formats {sorted(formats)}, leaky {leaky}, access_log {logs}",
    )
    c.check(
        re.search(r"limit_req\s+zone=", proxy) is not None and re.search(r"limit_conn\s+\S+\s+\d+", proxy) is not None,
        "the front door limits requests and connections per client address",
    )
    for route in by_kind.get("HTTPRoute", []):
        rules = route["spec"].get("rules", [])
        c.check(
            bool(rules) and all(r.get("timeouts", {}).get("request") == "0s" for r in rules),
            f"HTTPRoute {route['metadata']['name']} puts no time limit on a WebSocket",
        )

    print(f"{target}: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
