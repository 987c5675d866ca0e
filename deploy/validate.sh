#!/usr/bin/env bash
# Offline checks of the deployment artifacts (deploy/k8s, deploy/compose, deploy/monitoring).
# Exits non-zero if any check fails; prints each check and a summary.
#
#   deploy/validate.sh
#
# Tools: kubernetes-validate (PyPI, pinned below; installed into target/deploy-venv on first
# use: that one step needs the package registry, every later run is offline), docker-compose
# (Debian's 1.29), promtool (Debian's prometheus package). Optional, used when present:
# kubectl (kustomize build), nats-server >= 2.10 (config test), haproxy (config test).
# Environment: K8S_VERSION (default 1.30.0), DEPLOY_VENV (default target/deploy-venv).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
K8S_VERSION=${K8S_VERSION:-1.30.0}
KV_VERSION=1.37.0
VENV=${DEPLOY_VENV:-$ROOT/target/deploy-venv}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

passed=0
failed=0
skipped=0
failures=()
ok() { passed=$((passed + 1)); echo "  ok    $*"; }
bad() { failed=$((failed + 1)); failures+=("$*"); echo "  FAIL  $*"; }
skip() { skipped=$((skipped + 1)); echo "  skip  $*"; }
# run NAME CMD...: runs CMD with its output in a log; shows the log on failure.
run() {
  local name=$1; shift
  if "$@" >"$TMP/log" 2>&1; then
    ok "$name"
  else
    bad "$name"
    sed 's/^/        /' "$TMP/log" | tail -40
  fi
}
need() { command -v "$1" >/dev/null 2>&1 || [ -x "$1" ]; }

# --- tools -------------------------------------------------------------------------------
echo "== tools"
if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$KV_VERSION"; then
  echo "  installing kubernetes-validate==$KV_VERSION into $VENV"
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "kubernetes-validate==$KV_VERSION" \
    || { echo "validate: cannot install kubernetes-validate" >&2; exit 1; }
fi
PY=$VENV/bin/python   # has PyYAML (a dependency of kubernetes-validate)
echo "  kubernetes-validate $("$VENV/bin/kubernetes-validate" --version) (schemas for k8s $K8S_VERSION, strict)"
for t in docker-compose promtool; do
  need "$t" || { echo "validate: $t is missing (apt-get install docker-compose prometheus)" >&2; exit 1; }
done
echo "  $(docker-compose version --short 2>/dev/null | sed 's/^/docker-compose /')"
echo "  $(promtool --version 2>&1 | head -1)"
NATS=""
for c in "${NATS_SERVER_BIN:-}" "$(command -v nats-server 2>/dev/null)" /opt/oh-tools/nats-server-trixie/usr/sbin/nats-server; do
  [ -n "$c" ] && [ -x "$c" ] || continue
  if "$c" --version 2>/dev/null | grep -qE 'v2\.(1[0-9]|[2-9][0-9])\.|v[3-9]\.'; then NATS=$c; break; fi
done

# --- Kubernetes -------------------------------------------------------------------------------
echo "== deploy/k8s"
for f in deploy/k8s/*.yaml; do
  case "$(basename "$f")" in
    kustomization.yaml) continue ;; # not a Kubernetes resource (checked below)
  esac
  run "kubernetes-validate -k $K8S_VERSION --strict $f" \
    "$VENV/bin/kubernetes-validate" -k "$K8S_VERSION" --strict --quiet "$f"
done
run "kustomization.yaml lists every manifest, and they exist" "$PY" - <<'EOF'
import os, sys, yaml
k = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
listed = set(k["resources"])
have = {f for f in os.listdir("deploy/k8s") if f.endswith(".yaml") and f != "kustomization.yaml"}
missing = listed - have
unlisted = have - listed
if missing or unlisted:
    sys.exit(f"missing files: {sorted(missing)}; files not listed: {sorted(unlisted)}")
EOF
if need kubectl; then
  run "kubectl kustomize deploy/k8s (build, then kubernetes-validate of the output)" \
    bash -c "kubectl kustomize deploy/k8s >'$TMP/kustomized.yaml' && '$VENV/bin/kubernetes-validate' -k '$K8S_VERSION' --strict --quiet '$TMP/kustomized.yaml'"
else
  skip "kubectl kustomize (no kubectl)"
fi
# The example Secret must hold exactly deploy/auth's templates, rendered for namespace "oh"
# with the change-me passwords, and the URL files must use the same passwords.
run "secrets.yaml matches deploy/auth/*.in (rendered) and the URL files" "$PY" - <<'EOF'
import sys, yaml
docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(open("deploy/k8s/secrets.yaml"))}
def render(path, svc):
    t = open(path).read().replace("@NS@", "oh")
    for role in ("admin", "gateway", "worker", "loadtest"):
        t = t.replace(f"@{role.upper()}_PASSWORD@", f"change-me-{svc}-{role}")
    return t
errs = []
if docs["oh-nats-auth"]["stringData"]["nats-auth.conf"] != render("deploy/auth/nats-auth.conf.in", "nats"):
    errs.append("oh-nats-auth/nats-auth.conf differs from deploy/auth/nats-auth.conf.in rendered")
if docs["oh-redis-acl"]["stringData"]["users.acl"] != render("deploy/auth/redis-users.acl.in", "redis"):
    errs.append("oh-redis-acl/users.acl differs from deploy/auth/redis-users.acl.in rendered")
for role in ("gateway", "worker"):
    d = docs[f"oh-{role}-credentials"]["stringData"]
    if f"//{role}:change-me-nats-{role}@" not in d["nats-url"]:
        errs.append(f"{role} nats-url does not carry the {role} NATS user/password")
    if f"//{role}:change-me-redis-{role}@" not in d["redis-url"]:
        errs.append(f"{role} redis-url does not carry the {role} Redis user/password")
sys.exit("\n".join(errs) if errs else 0)
EOF
if [ -n "$NATS" ]; then
  # The ConfigMap's nats.conf with the Secret's auth file, laid out as in the pod.
  run "nats-server -t: k8s nats.conf + oh-nats-auth ($("$NATS" --version))" bash -c "
    mkdir -p '$TMP/k8snats/conf' '$TMP/k8snats/auth' && '$PY' - '$TMP/k8snats' <<'EOF'
import sys, yaml
d = sys.argv[1]
cm = [x for x in yaml.safe_load_all(open('deploy/k8s/nats.yaml')) if x['kind'] == 'ConfigMap'][0]
open(d + '/conf/nats.conf', 'w').write(cm['data']['nats.conf'].replace('/data/jetstream', d + '/js').replace('/var/run/nats', d))
s = [x for x in yaml.safe_load_all(open('deploy/k8s/secrets.yaml')) if x['metadata']['name'] == 'oh-nats-auth'][0]
open(d + '/auth/nats-auth.conf', 'w').write(s['stringData']['nats-auth.conf'])
EOF
    POD_NAME=nats-0 '$NATS' -c '$TMP/k8snats/conf/nats.conf' -t"
else
  skip "nats-server -t of the k8s nats.conf (no nats-server >= 2.10)"
fi

# --- compose ----------------------------------------------------------------------------------
echo "== deploy/compose"
run "docker-compose -f deploy/compose/compose.yaml config -q" \
  env OH_AUTH_TOKENS=dummy-token=dummy docker-compose -f deploy/compose/compose.yaml config -q
run "compose.yaml: 3 NATS, redis, 2 gateways, 3 workers, proxy; localhost/ images" "$PY" - <<'EOF'
import sys, yaml
c = yaml.safe_load(open("deploy/compose/compose.yaml"))["services"]
want = {"nats-1", "nats-2", "nats-3", "redis", "gateway-1", "gateway-2", "worker-1", "worker-2", "worker-3", "proxy"}
errs = [f"missing services: {sorted(want - set(c))}"] if want - set(c) else []
errs += [f"{n}: image {s.get('image')} is not localhost/" for n, s in c.items() if not str(s.get("image", "")).startswith("localhost/")]
ids = [c[w]["environment"]["OH_WORKER_ID"] for w in ("worker-1", "worker-2", "worker-3")]
if len(set(ids)) != 3:
    errs.append(f"OH_WORKER_ID not unique: {ids}")
sys.exit("\n".join(errs) if errs else 0)
EOF
if [ -n "$NATS" ]; then
  run "nats-server -t: compose nats.conf + rendered auth" bash -c "
    mkdir -p '$TMP/cnats/auth' &&
    sed -e 's#/data/jetstream#$TMP/cnats/js#' deploy/compose/nats.conf >'$TMP/cnats/nats.conf' &&
    sed -e 's/@NS@/oh/g' -e 's/@[A-Z]*_PASSWORD@/x/g' deploy/auth/nats-auth.conf.in >'$TMP/cnats/auth/nats-auth.conf' &&
    NATS_SERVER_NAME=nats-1 '$NATS' -c '$TMP/cnats/nats.conf' -t"
else
  skip "nats-server -t of the compose nats.conf (no nats-server >= 2.10)"
fi
if need haproxy; then
  # Names of the compose network do not resolve here: haproxy warns and still checks the rest.
  run "haproxy -c -f deploy/compose/haproxy.cfg" haproxy -c -q -f deploy/compose/haproxy.cfg
else
  skip "haproxy -c (no haproxy)"
fi
run "bash -n deploy/compose/{up,down,lib}.sh" bash -c 'for f in deploy/compose/up.sh deploy/compose/down.sh deploy/compose/lib.sh; do bash -n "$f" || exit 1; done'

# --- monitoring -------------------------------------------------------------------------------
echo "== deploy/monitoring"
# Debian's prometheus/promtool is built without Kubernetes service discovery (the field
# kubernetes_sd_configs is unknown to it). Then the file is checked by promtool with each
# kubernetes_sd_configs replaced by a static target (relabelling, rules and everything else as
# written), and the kubernetes_sd_configs blocks are checked for their fields here.
if promtool check config deploy/monitoring/prometheus.yml >"$TMP/log" 2>&1; then
  ok "promtool check config deploy/monitoring/prometheus.yml"
elif grep -q "field kubernetes_sd_configs not found" "$TMP/log"; then
  run "promtool check config deploy/monitoring/prometheus.yml (this promtool has no kubernetes_sd: checked with static targets in its place + field check)" \
    bash -c "'$PY' - '$TMP/prom-static.yml' <<'EOF' && promtool check config '$TMP/prom-static.yml'
import os, sys, yaml
cfg = yaml.safe_load(open('deploy/monitoring/prometheus.yml'))
errs = []
allowed_sd = {'role', 'namespaces', 'selectors', 'api_server', 'kubeconfig_file', 'attach_metadata'}
for job in cfg['scrape_configs']:
    for sd in job.pop('kubernetes_sd_configs', []):
        if sd.get('role') not in ('pod', 'endpoints', 'endpointslice', 'service', 'node', 'ingress'):
            errs.append(f\"{job['job_name']}: bad role {sd.get('role')}\")
        if set(sd) - allowed_sd:
            errs.append(f\"{job['job_name']}: unknown kubernetes_sd_configs fields {sorted(set(sd) - allowed_sd)}\")
        ns = sd.get('namespaces', {})
        if set(ns) - {'names', 'own_namespace'} or not all(isinstance(n, str) for n in ns.get('names', [])):
            errs.append(f\"{job['job_name']}: bad namespaces {ns}\")
        job.setdefault('static_configs', []).append({'targets': ['k8s-sd-placeholder:1']})
    for r in job.get('relabel_configs', []):
        for l in r.get('source_labels', []):
            if l.startswith('__meta_') and not (l.startswith('__meta_kubernetes_pod_') or l == '__meta_kubernetes_namespace'):
                errs.append(f\"{job['job_name']}: {l} is not a role=pod meta label\")
cfg['rule_files'] = [os.path.abspath(os.path.join('deploy/monitoring', f)) for f in cfg.get('rule_files', [])]
yaml.safe_dump(cfg, open(sys.argv[1], 'w'), sort_keys=False)
sys.exit('\n'.join(errs) if errs else 0)
EOF"
else
  bad "promtool check config deploy/monitoring/prometheus.yml"
  sed 's/^/        /' "$TMP/log"
fi
run "promtool check config deploy/monitoring/prometheus-compose.yml" promtool check config deploy/monitoring/prometheus-compose.yml
run "promtool check rules deploy/monitoring/alerts.yml" promtool check rules deploy/monitoring/alerts.yml
run "promtool test rules deploy/monitoring/alerts_test.yml" promtool test rules deploy/monitoring/alerts_test.yml
run "python3 -m json.tool deploy/monitoring/grafana-dashboard.json" python3 -m json.tool deploy/monitoring/grafana-dashboard.json
run "metric names of dashboard, alerts and alert tests are in deploy/monitoring/metrics.txt" "$PY" - <<'EOF'
import json, re, sys, yaml
known = {l.strip() for l in open("deploy/monitoring/metrics.txt") if l.strip() and not l.startswith("#")}
bad_lines = [n for n in known if not re.fullmatch(r"oh_(gateway|worker)_[a-z0-9_]+", n)]
if bad_lines:
    sys.exit(f"metrics.txt: not metric names: {bad_lines}")
builtin = {"up"}  # Prometheus' own series
name_re = re.compile(r"(?<![A-Za-z0-9_:\"'{$])(oh_[a-z0-9_]+)")
def check(where, expr, errs, used):
    for m in name_re.findall(expr):
        base = re.sub(r"_(bucket|sum|count)$", "", m)
        if m in known or base in known:
            used.add(m if m in known else base)
        else:
            errs.append(f"{where}: unknown metric {m}")
errs, used, exprs = [], set(), 0
dash = json.load(open("deploy/monitoring/grafana-dashboard.json"))
if dash.get("schemaVersion") != 39:
    errs.append("dashboard schemaVersion is not 39")
if not any(v.get("name") == "DS_PROMETHEUS" and v.get("type") == "datasource" for v in dash["templating"]["list"]):
    errs.append("dashboard has no DS_PROMETHEUS datasource variable")
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(dash["panels"]):
    if p.get("type") != "row" and p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        errs.append(f"panel {p.get('title')}: datasource is not ${{DS_PROMETHEUS}}")
    for t in p.get("targets", []):
        exprs += 1
        check(f"dashboard panel '{p['title']}'", t["expr"], errs, used)
        if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            errs.append(f"panel {p.get('title')}: target datasource is not ${{DS_PROMETHEUS}}")
for g in yaml.safe_load(open("deploy/monitoring/alerts.yml"))["groups"]:
    for r in g["rules"]:
        exprs += 1
        check(f"alert {r.get('alert') or r.get('record')}", r["expr"], errs, used)
for t in yaml.safe_load(open("deploy/monitoring/alerts_test.yml"))["tests"]:
    for s in t.get("input_series", []):
        name = s["series"].split("{")[0].strip()
        if name not in builtin:
            check("alerts_test.yml series", name, errs, set())
if errs:
    sys.exit("\n".join(errs))
print(f"{exprs} expressions use {len(used)} of {len(known)} known metrics")
EOF
grep -h "known metrics" "$TMP/log" | sed 's/^/        /'

echo "== summary: $passed passed, $failed failed, $skipped skipped"
if [ "$failed" -gt 0 ]; then
  printf '  failed: %s\n' "${failures[@]}"
  exit 1
fi
