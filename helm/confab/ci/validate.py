"""Lint, render and check the confab chart (see validate.sh).

For every value set: `helm lint --strict` (against the oldest and the newest
Kubernetes version claimed), render, validate every object strictly against
the API schemas of both versions (the ServiceMonitor, a CRD, is checked by
hand), and check the cross-references every value set must keep: probes on
the server's routes and port, container ports equal to the ports the server
is told to use, selectors that match the pod labels, a grace period longer
than the drain deadline, no surging update. Then checks that bad values are
refused, by the schema or by the templates, with the right message.

Runs offline: helm-python-sdk bundles Helm's Go library and
kubernetes-validate its schemas.
"""

import base64
import os
import re
import sys
import time
import tomllib

import helm_python as helm
import kubernetes_validate
import yaml

CHART = sys.argv[1]
STARTED = time.monotonic()
with open(os.path.join(CHART, "Chart.yaml")) as f:
    CHART_META = yaml.safe_load(f)
# From the oldest Kubernetes the chart claims (Chart.yaml kubeVersion) to the
# newest the bundled schemas know, every minor version; lint runs against the
# two ends.
OLDEST = re.match(r">=\s*(\d+\.\d+)", CHART_META["kubeVersion"]).group(1) + ".0"
NEWEST = kubernetes_validate.latest_version()
KUBE_VERSIONS = [f"1.{m}.0" for m in range(int(OLDEST.split(".")[1]), int(NEWEST.split(".")[1]) + 1)]
LINT_VERSIONS = [KUBE_VERSIONS[0], KUBE_VERSIONS[-1]]
SECRET = {"auth": {"jwtSecret": "0123456789abcdef0123"}}
WORKLOADS = ("Deployment", "DaemonSet")

failures = []
quiet = [False]
counts = {"value sets": 0, "objects validated": 0, "refusals": 0}


def check(cond, what):
    if not cond:
        failures.append(what)
        if not quiet[0]:
            print(f"  FAIL {what}")


def merge(*dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lint(name, values):
    for version in LINT_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}")
        # Severity 1 is "info" (e.g. "icon is recommended"); strict fails on warnings.
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
        check(not problems, f"{name}: lint for {version}: {problems}")


def check_service_monitor(name, doc):
    """A CRD: no schema in kubernetes-validate, so check the fields we use."""
    check(doc["apiVersion"] == "monitoring.coreos.com/v1", f"{name}: ServiceMonitor apiVersion")
    spec = doc["spec"]
    check(set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}, f"{name}: ServiceMonitor spec keys {sorted(spec)}")
    check(set(spec["selector"]) == {"matchLabels"}, f"{name}: ServiceMonitor selector")
    check(spec["namespaceSelector"] == {"matchNames": [doc["metadata"]["namespace"]]}, f"{name}: ServiceMonitor namespace")
    duration = re.compile(r"^([0-9]+(ms|s|m|h))+$")
    for ep in spec["endpoints"]:
        check(set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}, f"{name}: ServiceMonitor endpoint keys {sorted(ep)}")
        check(isinstance(ep["port"], str) and ep["path"] == "/metrics" and ep["scheme"] == "http", f"{name}: ServiceMonitor endpoint {ep}")
        check(all(duration.match(ep[k]) for k in ("interval", "scrapeTimeout")), f"{name}: ServiceMonitor durations {ep}")


def render(name, values):
    manifests = helm.Chart.load(CHART).render(values, name="confab", namespace="calls", is_install=True)
    objects = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            check(key not in objects, f"{name}: {key} rendered twice")
            objects[key] = doc
            check(doc["metadata"].get("namespace") == "calls", f"{name}: {key} namespace")
            if doc["kind"] == "ServiceMonitor":
                check_service_monitor(name, doc)
                continue
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                    counts["objects validated"] += 1
                except Exception as e:  # noqa: BLE001 - report every schema error
                    check(False, f"{name}: {doc['kind']} invalid for {version}: {e}")
    notes = next(t for p, t in manifests.items() if p.endswith("NOTES.txt"))
    return objects, notes


def workload(objects):
    found = [o for (kind, _), o in objects.items() if kind in WORKLOADS]
    assert len(found) == 1, f"expected one workload, got {len(found)}"
    return found[0]


def pod(objects):
    return workload(objects)["spec"]["template"]["spec"]


def env(objects):
    return {e["name"]: e for e in pod(objects)["containers"][0]["env"]}


def ports(objects):
    return {p["name"]: p for p in pod(objects)["containers"][0]["ports"]}


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_of(address):
    """The port of "host:port" or "[v6]:port"."""
    return int(address.rsplit(":", 1)[1])


def cross_references(name, objects, notes):
    """What must hold for every value set."""
    w = workload(objects)
    spec = pod(objects)
    c = spec["containers"][0]
    e, p = env(objects), ports(objects)
    labels = w["spec"]["template"]["metadata"]["labels"]
    where = f"{name}: "

    # Probes: the server's routes, on the port it listens on (a --listen flag
    # in args would override CONFAB_LISTEN).
    args = c.get("args", [])
    listen = port_of(e["CONFAB_LISTEN"]["value"])
    for i, a in enumerate(args):
        if a.startswith("--listen="):
            listen = port_of(a.split("=", 1)[1])
        elif a == "--listen" and i + 1 < len(args):
            listen = port_of(args[i + 1])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        check(get["path"] == path, where + f"{probe} path {get['path']}")
        named = p.get(get["port"]) if isinstance(get["port"], str) else None
        check(named is not None and named["protocol"] == "TCP", where + f"{probe} port {get['port']} names a TCP container port")
        check(named is not None and named["containerPort"] == listen, where + f"{probe} port is CONFAB_LISTEN's {listen}")
    check(p["http"]["containerPort"] == listen, where + "http port is CONFAB_LISTEN's")

    # Container ports are the ports the server is told to use.
    check(p["media"]["protocol"] == "UDP" and p["media"]["containerPort"] == int(e["CONFAB_MEDIA_PORT"]["value"]),
          where + "media container port = CONFAB_MEDIA_PORT, UDP")
    if "turn" in p:
        check(p["turn"]["protocol"] == "UDP" and p["turn"]["containerPort"] == int(e["CONFAB_TURN_PORT"]["value"]),
              where + "turn container port = CONFAB_TURN_PORT, UDP")
        check("CONFAB_NO_TURN" not in e, where + "TURN port but CONFAB_NO_TURN")
    else:
        check(e.get("CONFAB_NO_TURN", {}).get("value") == "true", where + "no TURN port, so CONFAB_NO_TURN")
    if "metrics" in p:
        check(p["metrics"]["containerPort"] == port_of(e["CONFAB_METRICS_LISTEN"]["value"]),
              where + "metrics container port = CONFAB_METRICS_LISTEN's")
    else:
        check("CONFAB_METRICS_LISTEN" not in e, where + "CONFAB_METRICS_LISTEN without a metrics port")
    numbers = [(q["containerPort"], q["protocol"]) for q in p.values()]
    check(len(numbers) == len(set(numbers)), where + f"container ports clash {numbers}")

    # Host network: every port is the node's, and DNS still finds cluster names.
    if spec.get("hostNetwork"):
        check(spec.get("dnsPolicy") == "ClusterFirstWithHostNet", where + "dnsPolicy with hostNetwork")
        check(all(q.get("hostPort") == q["containerPort"] for q in p.values()), where + "hostPort = containerPort")
    else:
        check(all("hostPort" not in q for q in p.values()), where + "no hostPorts without hostNetwork")

    # Drain: Kubernetes must not kill the pod before the server's deadline.
    drain = int(e["CONFAB_DRAIN_TIMEOUT_SECS"]["value"])
    check(spec["terminationGracePeriodSeconds"] > drain,
          where + f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} > drain {drain}")

    # Never surge.
    if w["kind"] == "Deployment":
        strategy = w["spec"]["strategy"]
        check(strategy["type"] == "Recreate" or strategy["rollingUpdate"]["maxSurge"] == 0, where + f"non-surging {strategy}")
    else:
        strategy = w["spec"]["updateStrategy"]
        check(strategy["type"] == "OnDelete" or strategy["rollingUpdate"]["maxSurge"] == 0, where + f"non-surging {strategy}")

    # Selectors match the pod labels.
    check(matches(w["spec"]["selector"]["matchLabels"], labels), where + "workload selector")
    services = {n: o for (k, n), o in objects.items() if k == "Service"}
    for svc_name, svc in services.items():
        check(matches(svc["spec"]["selector"], labels), where + f"Service {svc_name} selector")
        for sp in svc["spec"]["ports"]:
            target = p.get(sp["targetPort"])
            check(target is not None and target["protocol"] == sp["protocol"],
                  where + f"Service {svc_name} port {sp['name']} targets container port {sp['targetPort']}")
    for (kind, _), o in objects.items():
        if kind == "PodDisruptionBudget":
            check(matches(o["spec"]["selector"]["matchLabels"], labels), where + "PDB selector")
        if kind == "ServiceMonitor":
            chosen = [s for s in services.values() if matches(o["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            check(len(chosen) == 1, where + f"ServiceMonitor selects {len(chosen)} Services")
            for ep in o["spec"]["endpoints"]:
                names = [sp["name"] for s in chosen for sp in s["spec"]["ports"]]
                check(ep["port"] in names, where + f"ServiceMonitor port {ep['port']} in {names}")
                served = "metrics" if "metrics" in p else "http"
                check(ep["port"] == served, where + f"ServiceMonitor scrapes {ep['port']}, /metrics is on {served}")
        if kind == "Ingress":
            for rule in o["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    svc = services.get(backend["name"])
                    check(svc is not None and backend["port"]["name"] in [sp["name"] for sp in svc["spec"]["ports"]],
                          where + f"Ingress backend {backend}")
                    check(backend["port"]["name"] == "http", where + "Ingress goes to the http port")
    ann = w["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in ann:
        check(int(ann["prometheus.io/port"]) == p["metrics" if "metrics" in p else "http"]["containerPort"],
              where + "prometheus.io/port is the port serving /metrics")

    # Secrets and the config file the pod refers to exist or are the user's.
    for var in e.values():
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref and ("Secret", ref["name"]) in objects:
            check(ref["key"] in objects[("Secret", ref["name"])]["data"], where + f"{var['name']} key in Secret")
    if "CONFAB_CONFIG" in e:
        path = e["CONFAB_CONFIG"]["value"]
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        cm = objects[("ConfigMap", volume["configMap"]["name"])]
        text = cm["data"][os.path.basename(path)]
        parsed = tomllib.loads(text)
        check(all(re.match(r"^[a-z][a-z0-9-]*$", k) for k in parsed), where + f"config keys {sorted(parsed)}")
        check("checksum/config" in ann, where + "pod restarts when the config changes")

    # The notes tell where to go.
    check(f"UDP {p['media']['containerPort']}" in notes or f":{p['media']['containerPort']}" in notes, where + "NOTES name the media port")
    check("confab token" in notes or "WARNING: dev mode" in notes, where + "NOTES say how to get a token")
    if "turn" in p:
        check(f"UDP {p['turn']['containerPort']}" in notes, where + "NOTES name the TURN port")


def case(name, values):
    print(name)
    counts["value sets"] += 1
    lint(name, values)
    objects, notes = render(name, values)
    cross_references(name, objects, notes)
    print(f"  rendered {sorted(k for k, _ in objects)}")
    return objects, notes


def must_fail(name, values, message):
    print(name)
    counts["refusals"] += 1
    try:
        helm.Chart.load(CHART).render(values, name="confab", namespace="calls")
    except helm.HelmError as e:
        text = " ".join(str(e).split())
        check(message in text, f"{name}: wrong error: {text}")
        print(f"  refused: {text[:200]}")
        return
    check(False, f"{name}: rendered, but must fail")


check(KUBE_VERSIONS[0] == "1.29.0" and NEWEST in KUBE_VERSIONS, f"versions from Chart.yaml and the schemas: {KUBE_VERSIONS}")
print(f"Kubernetes versions: {', '.join(KUBE_VERSIONS)}")

# Defaults with a secret: Deployment, hostNetwork, the node's IP in the candidates.
# Defaults alone: the chart generates the secret into its own Secret.
objs, notes = case("defaults (generated secret)", {})
generated = base64.b64decode(objs[("Secret", "confab")]["data"]["jwt-secret"]).decode()
check(len(generated) == 48 and generated.isalnum(), "a generated secret of 48 characters")
check(env(objs)["CONFAB_JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "confab", "key": "jwt-secret"},
      "the server reads the generated secret")
check("CONFAB_INSECURE" not in env(objs), "not dev mode")
again, _ = case("defaults again", {})
check(base64.b64decode(again[("Secret", "confab")]["data"]["jwt-secret"]).decode() != generated,
      "offline (no cluster to look the Secret up in), each render generates anew")

objs, notes = case("defaults + secret", SECRET)
w, spec, e, p = workload(objs), pod(objs), env(objs), ports(objs)
check(w["kind"] == "Deployment" and w["spec"]["replicas"] == 1, "a Deployment of one")
check(w["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}, f"strategy {w['spec']['strategy']}")
check(spec.get("hostNetwork") is True, "hostNetwork on by default")
check(spec.get("dnsPolicy") == "ClusterFirstWithHostNet", "dnsPolicy for hostNetwork")
check(p["media"] == {"name": "media", "containerPort": 7882, "hostPort": 7882, "protocol": "UDP"}, f"media port {p['media']}")
check(p["http"]["containerPort"] == p["http"]["hostPort"] == 7880, f"http port {p['http']}")
check(p["turn"] == {"name": "turn", "containerPort": 3478, "hostPort": 3478, "protocol": "UDP"}, f"turn port {p.get('turn')}")
check(set(p) == {"http", "media", "turn"}, f"ports {sorted(p)}")
check(e["CONFAB_PUBLIC_IP"].get("valueFrom") == {"fieldRef": {"fieldPath": "status.hostIP"}}, "public IP from status.hostIP")
check(e["CONFAB_LISTEN"]["value"] == "0.0.0.0:7880", "CONFAB_LISTEN")
check(e["CONFAB_DRAIN_TIMEOUT_SECS"]["value"] == "600" and spec["terminationGracePeriodSeconds"] == 630, "drain 600 s, grace 630 s")
check(e["CONFAB_MEDIA_PORT"]["value"] == "7882", "CONFAB_MEDIA_PORT")
check(e["CONFAB_MAX_PARTICIPANTS"]["value"] == "16", "maxParticipants 16")
check(e["CONFAB_SFU_THRESHOLD"]["value"] == "3", "CONFAB_SFU_THRESHOLD")
check(e["CONFAB_P2P_RETURN_DELAY_MS"]["value"] == "5000", "CONFAB_P2P_RETURN_DELAY_MS")
check(e["CONFAB_SWITCH_TIMEOUT_MS"]["value"] == "8000", "CONFAB_SWITCH_TIMEOUT_MS")
check(e["CONFAB_LOG_FORMAT"]["value"] == "text", "CONFAB_LOG_FORMAT")
check(not {"CONFAB_NEVER_P2P", "CONFAB_INSECURE", "CONFAB_METRICS_LISTEN", "CONFAB_CONFIG"} & set(e), "no never-p2p, insecure, metrics listener or config")
check("secretKeyRef" in e["CONFAB_JWT_SECRET"]["valueFrom"], "secret from a Secret")
check(e["CONFAB_TURN_PORT"]["value"] == "3478" and e["CONFAB_TURN_RELAY_PORTS"]["value"] == "49152-65535", "TURN port and relay range")
check(not {"CONFAB_NO_TURN", "CONFAB_TURN_SECRET", "CONFAB_TURN_EXTERNAL"} & set(e), "embedded TURN, random secret")
check("CONFAB_TRUST_FORWARDED_FOR" not in e, "X-Forwarded-For not trusted without a proxy")
check(("Service", "confab-media") not in objs and ("ServiceMonitor", "confab") not in objs and ("Ingress", "confab") not in objs,
      "no media Service, ServiceMonitor or Ingress by default")
check(objs[("PodDisruptionBudget", "confab")]["spec"]["maxUnavailable"] == 1, "PDB maxUnavailable 1")
anti = spec["affinity"]["podAntiAffinity"]
check(list(anti) == ["preferredDuringSchedulingIgnoredDuringExecution"]
      and anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname",
      "soft anti-affinity by node")
check(c := pod(objs)["containers"][0], "container")
check(c["image"] == f"confab:{CHART_META['appVersion']}" and "args" not in c and "command" not in c,
      "image confab:<appVersion> with its own entrypoint (confab serve)")
check("UDP port 7882" in notes and "status.hostIP" in notes and "UDP 49152-65535" in notes, "NOTES name the UDP ports and the node IP")
check("/readyz" in notes and "630" in notes, "NOTES explain the drain")

# hostNetwork off: NodePort UDP Service, no TURN, no hostPorts.
objs, notes = case("hostNetwork=false + NodePort + publicIP", merge(SECRET, {
    "hostNetwork": False,
    "media": {"port": 31882, "publicIP": "198.51.100.20", "service": {"enabled": True, "type": "NodePort"}}}))
spec, e, p = pod(objs), env(objs), ports(objs)
svc = objs[("Service", "confab-media")]["spec"]
check("hostNetwork" not in spec and "dnsPolicy" not in spec, "no hostNetwork")
check("turn" not in p and e["CONFAB_NO_TURN"]["value"] == "true", "no embedded TURN without hostNetwork")
check(svc["type"] == "NodePort" and svc["externalTrafficPolicy"] == "Local", "NodePort, Local")
check(svc["ports"] == [{"name": "media", "port": 31882, "targetPort": "media", "protocol": "UDP", "nodePort": 31882}], f"media Service ports {svc['ports']}")
check(e["CONFAB_PUBLIC_IP"]["value"] == "198.51.100.20", "public IP")
check("198.51.100.20:31882" in notes, "NOTES name the address")

# hostNetwork off: LoadBalancer UDP Service, IPv6 address.
objs, notes = case("hostNetwork=false + LoadBalancer + IPv6 publicIP", merge(SECRET, {
    "hostNetwork": False,
    "media": {"publicIP": "2001:db8::7", "service": {"enabled": True, "type": "LoadBalancer"}}}))
svc = objs[("Service", "confab-media")]["spec"]
check(svc["type"] == "LoadBalancer" and "nodePort" not in svc["ports"][0] and svc["ports"][0]["port"] == 7882, "LoadBalancer port")

# ServiceMonitor on (metrics on the HTTP port) + scrape annotations.
objs, notes = case("serviceMonitor", merge(SECRET, {
    "metrics": {"scrapeAnnotations": True, "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kps"}}}}))
sm = objs[("ServiceMonitor", "confab")]
check(sm["metadata"]["labels"]["release"] == "kps", "ServiceMonitor labels")
check(sm["spec"]["endpoints"][0]["port"] == "http" and sm["spec"]["endpoints"][0]["interval"] == "15s", "ServiceMonitor scrapes http")
check(workload(objs)["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "7880", "scrape port")

# Separate metrics listener, with a ServiceMonitor.
objs, notes = case("metrics.port + serviceMonitor", merge(SECRET, {
    "metrics": {"port": 9464, "scrapeAnnotations": True, "serviceMonitor": {"enabled": True}}}))
e, p = env(objs), ports(objs)
check(e["CONFAB_METRICS_LISTEN"]["value"] == "0.0.0.0:9464", "CONFAB_METRICS_LISTEN")
check(p["metrics"] == {"name": "metrics", "containerPort": 9464, "hostPort": 9464, "protocol": "TCP"}, f"metrics port {p.get('metrics')}")
check([sp["name"] for sp in objs[("Service", "confab")]["spec"]["ports"]] == ["http", "metrics"], "Service has a metrics port")
check(objs[("ServiceMonitor", "confab")]["spec"]["endpoints"][0]["port"] == "metrics", "ServiceMonitor scrapes metrics")
check(pod(objs)["containers"][0]["readinessProbe"]["httpGet"]["port"] == "http", "probes stay on http")
check("port 9464" in notes, "NOTES name the metrics port")

# DaemonSet.
objs, notes = case("DaemonSet", merge(SECRET, {"kind": "DaemonSet", "nodeSelector": {"confab.example.org/media": "true"}}))
w = workload(objs)
check(w["kind"] == "DaemonSet" and "replicas" not in w["spec"], "a DaemonSet")
check(w["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}, "DaemonSet strategy")
check("affinity" not in pod(objs), "no anti-affinity for a DaemonSet")
check(("PodDisruptionBudget", "confab") in objs, "PDB for the DaemonSet too")
check("kind is DaemonSet" in notes, "NOTES warn about rooms across pods")

# Ingress with TLS, an existing Secret.
objs, notes = case("ingress + existingSecret", {
    "auth": {"existingSecret": "confab-auth"},
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "confab-tls", "hosts": ["confab.example.org"]}]}})
e = env(objs)
check(e["CONFAB_JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "confab-auth", "key": "jwt-secret"}, "existing Secret")
check(("Secret", "confab") not in objs, "no own Secret")
check(objs[("Ingress", "confab")]["spec"]["ingressClassName"] == "nginx", "Ingress class")
check(e.get("CONFAB_TRUST_FORWARDED_FOR", {}).get("value") == "true",
      "behind the Ingress the join limit keys on X-Forwarded-For")
check("https://confab.example.org/" in notes, "NOTES give the URL")

# Recreate, hard anti-affinity, drain settings, config file, JSON logs, TURN from a Secret.
objs, notes = case("Recreate + config file + drain + external TURN", merge(SECRET, {
    "updateStrategy": {"type": "Recreate"}, "podAntiAffinity": "hard",
    "drain": {"timeoutSeconds": 120, "graceMarginSeconds": 15},
    "server": {"logFormat": "json"},
    "config": {"rate-per-sec": 50, "rate-burst": 80.5, "turn-realm": "example.org", "insecure": False},
    "turn": {"existingSecret": "confab-turn", "external": ["turn:turn.example.org:3478?transport=udp"], "userQuota": 4}}))
w, spec, e = workload(objs), pod(objs), env(objs)
check(w["spec"]["strategy"] == {"type": "Recreate"}, "Recreate")
check("requiredDuringSchedulingIgnoredDuringExecution" in spec["affinity"]["podAntiAffinity"], "hard anti-affinity")
check(e["CONFAB_DRAIN_TIMEOUT_SECS"]["value"] == "120" and spec["terminationGracePeriodSeconds"] == 135, "drain 120, grace 135")
check(e["CONFAB_LOG_FORMAT"]["value"] == "json", "JSON logs")
toml = tomllib.loads(objs[("ConfigMap", "confab")]["data"]["confab.toml"])
check(toml == {"rate-per-sec": 50, "rate-burst": 80.5, "turn-realm": "example.org", "insecure": False}, f"config file {toml}")
check(isinstance(toml["rate-per-sec"], int), "integers stay integers in TOML")
check(e["CONFAB_CONFIG"]["value"] == "/etc/confab/confab.toml", "CONFAB_CONFIG")
check(e["CONFAB_TURN_SECRET"]["valueFrom"] == {"secretKeyRef": {"name": "confab-turn", "key": "turn-secret"}}, "TURN secret from a Secret")
check(e["CONFAB_TURN_EXTERNAL"]["value"] == "turn:turn.example.org:3478?transport=udp", "external TURN URL")

# Literal public IP with hostNetwork, mode settings, no PDB.
objs, notes = case("publicIP + mode settings + no PDB", merge(SECRET, {
    "media": {"publicIP": "203.0.113.7"}, "podDisruptionBudget": {"enabled": False},
    "sfu": {"threshold": 4, "neverP2P": True, "neverP2PRooms": ["town-hall-*"]}, "server": {"maxParticipants": 8}}))
e = env(objs)
check(e["CONFAB_PUBLIC_IP"].get("value") == "203.0.113.7", "literal public IP")
check(e["CONFAB_NEVER_P2P"]["value"] == "true" and e["CONFAB_NEVER_P2P_ROOMS"]["value"] == "town-hall-*", "never-p2p")
check(("PodDisruptionBudget", "confab") not in objs, "PDB off")
check("203.0.113.7:7882" in notes, "NOTES name the public IP")

# Dev mode.
objs, notes = case("insecureDevMode", {"auth": {"insecureDevMode": True}})
e = env(objs)
check(e["CONFAB_INSECURE"]["value"] == "true" and "CONFAB_JWT_SECRET" not in e, "dev mode env")
check(("Secret", "confab") not in objs, "no Secret in dev mode")
check("WARNING: dev mode" in notes, "dev mode warning")

# The cross-reference check itself: a --listen flag that moves the server
# off the port the probes use must be noticed.
before = len(failures)
objs, notes = render("args --listen=:9000", merge(SECRET, {"args": ["--listen=0.0.0.0:9000"]}))
quiet[0] = True
cross_references("args --listen=:9000", objs, notes)
quiet[0] = False
caught = len(failures) > before
del failures[before:]
check(caught, "a --listen flag off the probes' port is caught")
if caught:
    print("args --listen off the probes' port: caught by the cross-reference checks")

# Bad values the schema refuses before any template runs.
SCHEMA = "values don't meet the specifications of the schema"
must_fail("schema: port as a string", merge(SECRET, {"server": {"port": "http"}}), "at '/server/port': got string, want integer")
must_fail("schema: media port out of range", merge(SECRET, {"media": {"port": 70000}}), "at '/media/port': maximum")
must_fail("schema: TURN port 0", merge(SECRET, {"turn": {"port": 0}}), "at '/turn/port': minimum")
must_fail("schema: unknown kind", merge(SECRET, {"kind": "StatefulSet"}), "at '/kind': value must be one of")
must_fail("schema: unknown top-level key", merge(SECRET, {"replicas": 2}), "additional properties 'replicas' not allowed")
must_fail("schema: 0.2.0's terminationGracePeriodSeconds", merge(SECRET, {"terminationGracePeriodSeconds": 30}),
          "additional properties 'terminationGracePeriodSeconds' not allowed")
must_fail("schema: negative drain", merge(SECRET, {"drain": {"timeoutSeconds": -1}}), "at '/drain/timeoutSeconds': minimum")
must_fail("schema: grace margin below 5 s", merge(SECRET, {"drain": {"graceMarginSeconds": 0}}), "at '/drain/graceMarginSeconds': minimum")
must_fail("schema: unknown update strategy", merge(SECRET, {"updateStrategy": {"type": "Surge"}}), "at '/updateStrategy/type'")
must_fail("schema: maxUnavailable 0 (would never update without a surge)", merge(SECRET, {"updateStrategy": {"maxUnavailable": 0}}),
          "at '/updateStrategy/maxUnavailable'")
must_fail("schema: probe path override", merge(SECRET, {"readinessProbe": {"httpGet": {"path": "/healthz"}}}),
          "additional properties 'httpGet' not allowed")
must_fail("schema: bad log format", merge(SECRET, {"server": {"logFormat": "logfmt"}}), "at '/server/logFormat'")
must_fail("schema: short JWT secret", {"auth": {"jwtSecret": "short"}}, "at '/auth/jwtSecret'")
must_fail("schema: bool as a string", merge(SECRET, {"hostNetwork": "yes"}), "at '/hostNetwork': got string, want boolean")
must_fail("schema: bad ServiceMonitor interval", merge(SECRET, {"metrics": {"serviceMonitor": {"interval": "30"}}}),
          "at '/metrics/serviceMonitor/interval'")
must_fail("schema: secret in the config file", merge(SECRET, {"config": {"jwt-secret": "0123456789abcdef0123"}}), "at '/config'")
must_fail("schema: config key not in kebab-case", merge(SECRET, {"config": {"rate_per_sec": 5}}), "invalid propertyName 'rate_per_sec'")

# Bad values the templates refuse (they need more than one value to see).
must_fail("template: config key the chart sets", merge(SECRET, {"config": {"media-port": 9000}}),
          "config.media-port would be ignored: the chart already sets CONFAB_MEDIA_PORT")
must_fail("template: metrics on the HTTP port", merge(SECRET, {"metrics": {"port": 7880}}), "metrics.port (7880) must differ from server.port")
must_fail("template: TURN and media on one port", merge(SECRET, {"turn": {"port": 7882}}), "turn.port and media.port are both UDP port 7882")
must_fail("template: Recreate for a DaemonSet", merge(SECRET, {"kind": "DaemonSet", "updateStrategy": {"type": "Recreate"}}),
          "Recreate is for a Deployment")
must_fail("template: OnDelete for a Deployment", merge(SECRET, {"updateStrategy": {"type": "OnDelete"}}), "OnDelete is for a DaemonSet")
must_fail("template: turn external without a secret", merge(SECRET, {"turn": {"external": ["turn:t.example.org"]}}),
          "turn.external needs turn.existingSecret")
must_fail("template: hostNetwork=false without publicIP", merge(SECRET, {"hostNetwork": False}),
          "media.publicIP is required when hostNetwork is false")
must_fail("template: NodePort outside the NodePort range", merge(SECRET, {
    "hostNetwork": False, "media": {"publicIP": "198.51.100.20", "service": {"enabled": True}}}),
          "must lie in the cluster's NodePort range")
must_fail("template: media Service with hostNetwork", merge(SECRET, {"media": {"service": {"enabled": True}}}),
          "media.service.enabled needs hostNetwork=false")
must_fail("template: wildcard publicIP", merge(SECRET, {"media": {"publicIP": "0.0.0.0"}}), "is not an address browsers can reach")
must_fail("template: no secret and none to generate", {"auth": {"generateSecret": False}}, "a JWT secret is required")

took = time.monotonic() - STARTED
print(f"{counts['value sets']} value sets rendered, {counts['objects validated']} object validations "
      f"(Kubernetes {KUBE_VERSIONS[0]} to {KUBE_VERSIONS[-1]}: {len(KUBE_VERSIONS)} versions), {counts['refusals']} bad value sets, {took:.1f} s")
print(f"{len(failures)} failed" if failures else "all chart checks passed")
sys.exit(1 if failures else 0)
