"""Lint, render and schema-check the confab chart (see validate.sh)."""

import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART = sys.argv[1]
# The oldest Kubernetes this chart targets and the newest the schemas know.
KUBE_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
SECRET = {"auth": {"jwtSecret": "0123456789abcdef0123"}}

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"  FAIL {what}")


def merge(*dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lint(name, values):
    report = helm.lint(CHART, values, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    check(not problems, f"{name}: lint {problems}")


def render(name, values):
    manifests = helm.Chart.load(CHART).render(values, name="confab", namespace="calls", is_install=True)
    objects = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
                for version in KUBE_VERSIONS:
                    try:
                        kubernetes_validate.validate(doc, version, strict=True)
                    except Exception as e:  # noqa: BLE001 - report every schema error
                        check(False, f"{name}: {doc['kind']} invalid for {version}: {e}")
    notes = next(t for p, t in manifests.items() if p.endswith("NOTES.txt"))
    return objects, notes


def pod(objects):
    return objects[("Deployment", "confab")]["spec"]["template"]["spec"]


def env(objects):
    return {e["name"]: e for e in pod(objects)["containers"][0]["env"]}


def ports(objects):
    return {p["name"]: p for p in pod(objects)["containers"][0]["ports"]}


def case(name, values):
    print(name)
    lint(name, values)
    objects, notes = render(name, values)
    print(f"  rendered {sorted(k for k, _ in objects)}")
    return objects, notes


def must_fail(name, values, message):
    print(name)
    try:
        helm.Chart.load(CHART).render(values, name="confab", namespace="calls")
    except helm.HelmError as e:
        check(message in str(e), f"{name}: wrong error: {e}")
        print(f"  refused: {str(e)[:160]}...")
        return
    check(False, f"{name}: rendered, but must fail")


# Defaults with a secret: hostNetwork, the node's IP in the candidates.
objs, notes = case("defaults + secret", SECRET)
spec, e, p = pod(objs), env(objs), ports(objs)
check(spec.get("hostNetwork") is True, "hostNetwork on by default")
check(spec.get("dnsPolicy") == "ClusterFirstWithHostNet", "dnsPolicy for hostNetwork")
check(p["media"] == {"name": "media", "containerPort": 7882, "hostPort": 7882, "protocol": "UDP"}, f"media port {p['media']}")
check(p["http"]["containerPort"] == p["http"]["hostPort"] == 7880, f"http port {p['http']}")
check(e["CONFAB_PUBLIC_IP"].get("valueFrom") == {"fieldRef": {"fieldPath": "status.hostIP"}}, "public IP from status.hostIP")
check(e["CONFAB_MEDIA_PORT"]["value"] == "7882", "CONFAB_MEDIA_PORT")
check(e["CONFAB_MAX_PARTICIPANTS"]["value"] == "16", "maxParticipants 16")
check(e["CONFAB_SFU_THRESHOLD"]["value"] == "3", "CONFAB_SFU_THRESHOLD")
check(e["CONFAB_P2P_RETURN_DELAY_MS"]["value"] == "5000", "CONFAB_P2P_RETURN_DELAY_MS")
check(e["CONFAB_SWITCH_TIMEOUT_MS"]["value"] == "8000", "CONFAB_SWITCH_TIMEOUT_MS")
check("CONFAB_NEVER_P2P" not in e and "CONFAB_INSECURE" not in e, "no never-p2p or insecure")
check("secretKeyRef" in e["CONFAB_JWT_SECRET"]["valueFrom"], "secret from a Secret")
check(objs[("Deployment", "confab")]["spec"]["strategy"] == {"type": "Recreate"}, "Recreate")
check(("Service", "confab-media") not in objs, "no media Service with hostNetwork")
check("UDP port 7882" in notes and "status.hostIP" in notes, "NOTES name the UDP port and the node IP")
check(p["turn"] == {"name": "turn", "containerPort": 3478, "hostPort": 3478, "protocol": "UDP"}, f"turn port {p.get('turn')}")
check(e["CONFAB_TURN_PORT"]["value"] == "3478" and e["CONFAB_TURN_RELAY_PORTS"]["value"] == "49152-65535", "TURN port and relay range")
check("CONFAB_NO_TURN" not in e and "CONFAB_TURN_SECRET" not in e and "CONFAB_TURN_EXTERNAL" not in e, "embedded TURN, random secret")

# TURN with a secret from a Secret and an external coturn.
objs, _ = case("turn secret + external", merge(SECRET, {
    "turn": {"existingSecret": "confab-turn", "external": ["turn:turn.example.org:3478?transport=udp"], "userQuota": 4}}))
e = env(objs)
check(e["CONFAB_TURN_SECRET"]["valueFrom"] == {"secretKeyRef": {"name": "confab-turn", "key": "turn-secret"}}, "TURN secret from a Secret")
check(e["CONFAB_TURN_EXTERNAL"]["value"] == "turn:turn.example.org:3478?transport=udp", "external TURN URL")
check(e["CONFAB_TURN_USER_QUOTA"]["value"] == "4", "user quota")
must_fail("turn external without a secret", merge(SECRET, {"turn": {"external": ["turn:t.example.org"]}}), "turn.external needs turn.existingSecret")
must_fail("turn bad relay range", merge(SECRET, {"turn": {"relayPorts": "49152"}}), "turn.relayPorts")

# Literal public IP with hostNetwork, mode settings.
objs, notes = case("hostNetwork + publicIP + mode settings", merge(SECRET, {
    "media": {"publicIP": "203.0.113.7"},
    "sfu": {"threshold": 4, "p2pReturnDelayMs": 3000, "switchTimeoutMs": 6000, "neverP2P": True},
    "server": {"maxParticipants": 8}}))
e = env(objs)
check(e["CONFAB_PUBLIC_IP"].get("value") == "203.0.113.7", "literal public IP")
check(e["CONFAB_NEVER_P2P"]["value"] == "true", "CONFAB_NEVER_P2P")
check(e["CONFAB_SFU_THRESHOLD"]["value"] == "4" and e["CONFAB_MAX_PARTICIPANTS"]["value"] == "8", "mode values")
check("203.0.113.7:7882" in notes, "NOTES name the public IP")

# No hostNetwork, NodePort UDP Service.
objs, notes = case("hostNetwork=false + NodePort + publicIP", merge(SECRET, {
    "hostNetwork": False,
    "media": {"port": 31882, "publicIP": "198.51.100.20", "service": {"enabled": True, "type": "NodePort"}}}))
spec, e, p = pod(objs), env(objs), ports(objs)
svc = objs[("Service", "confab-media")]["spec"]
check("hostNetwork" not in spec and "dnsPolicy" not in spec, "no hostNetwork")
check("hostPort" not in p["http"] and "hostPort" not in p["media"], "no hostPorts")
check("turn" not in p and e["CONFAB_NO_TURN"]["value"] == "true", "no embedded TURN without hostNetwork")
check(p["media"]["protocol"] == "UDP" and p["media"]["containerPort"] == 31882, "media container port")
check(svc["type"] == "NodePort" and svc["externalTrafficPolicy"] == "Local", "NodePort, Local")
check(svc["ports"] == [{"name": "media", "port": 31882, "targetPort": "media", "protocol": "UDP", "nodePort": 31882}], f"media Service ports {svc['ports']}")
check(e["CONFAB_PUBLIC_IP"]["value"] == "198.51.100.20", "public IP")
check("198.51.100.20:31882" in notes, "NOTES name the address")

# No hostNetwork, LoadBalancer UDP Service.
objs, notes = case("hostNetwork=false + LoadBalancer + publicIP", merge(SECRET, {
    "hostNetwork": False,
    "media": {"publicIP": "2001:db8::7", "service": {"enabled": True, "type": "LoadBalancer"}}}))
svc = objs[("Service", "confab-media")]["spec"]
check(svc["type"] == "LoadBalancer" and "nodePort" not in svc["ports"][0] and svc["ports"][0]["port"] == 7882, "LoadBalancer port")

# Features from before the media plane: existing Secret, Ingress, scrape annotations.
objs, notes = case("existingSecret + ingress + metrics", {
    "auth": {"existingSecret": "confab-auth"},
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "confab-tls", "hosts": ["confab.example.org"]}]},
    "metrics": {"scrapeAnnotations": True}})
e = env(objs)
check(e["CONFAB_JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "confab-auth", "key": "jwt-secret"}, "existing Secret")
check(("Secret", "confab") not in objs and ("Ingress", "confab") in objs, "no own Secret, an Ingress")
check(objs[("Deployment", "confab")]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "7880", "scrape port")

# Dev mode.
objs, notes = case("insecureDevMode", {"auth": {"insecureDevMode": True}})
e = env(objs)
check(e["CONFAB_INSECURE"]["value"] == "true" and "CONFAB_JWT_SECRET" not in e, "dev mode env")
check(("Secret", "confab") not in objs, "no Secret in dev mode")
check("WARNING: dev mode" in notes, "dev mode warning")

# Refusals.
must_fail("hostNetwork=false without publicIP", merge(SECRET, {"hostNetwork": False}),
          "media.publicIP is required when hostNetwork is false")
must_fail("NodePort outside the NodePort range", merge(SECRET, {
    "hostNetwork": False, "media": {"publicIP": "198.51.100.20", "service": {"enabled": True}}}),
          "must lie in the cluster's NodePort range")
must_fail("media Service with hostNetwork", merge(SECRET, {"media": {"service": {"enabled": True}}}),
          "media.service.enabled needs hostNetwork=false")
must_fail("host name as publicIP", merge(SECRET, {"media": {"publicIP": "media.example.org"}}),
          "media.publicIP must be an IPv4 or IPv6 address")
must_fail("wildcard publicIP", merge(SECRET, {"media": {"publicIP": "0.0.0.0"}}), "is not an address browsers can reach")
must_fail("sfu.threshold below 3", merge(SECRET, {"sfu": {"threshold": 2}}), "sfu.threshold must be at least 3")
must_fail("no secret", {}, "a JWT secret is required")

print(f"{len(failures)} failed" if failures else "all chart checks passed")
sys.exit(1 if failures else 0)
