# Shared by the measure-* benchmarks: release binaries, the local control plane, an operator
# serving one labelled pool, and real agents joined to it. Source it after setting ROOT, WORK,
# HTTP, GATEWAY, POOL and SELECTOR (the pool's label, as key=value).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/darkcore/target}"
source "$ROOT/tests/cluster/versions.env"
export PATH="$PATH:$HOME/.cache/darkcore/k8s-$K8S_VERSION:$HOME/.cache/darkcore/helm-$HELM_VERSION"
KWOK_BIN="$HOME/.cache/darkcore/kwok-$KWOK_VERSION/kwok"
# The operator and test tools: release builds, or DARKCORE_BENCH_BIN, a directory of other
# builds of them (target/debug for a quick look; its figures are not release figures).
BIN="${DARKCORE_BENCH_BIN:-$CARGO_TARGET_DIR/release}"
# The agent as the Debian package ships it (Cargo.toml's agent-release profile), or
# DARKCORE_BENCH_AGENT: another build of it, to compare two versions on one machine (A/B).
AGENT="${DARKCORE_BENCH_AGENT:-$CARGO_TARGET_DIR/agent-release/darkcore-agent}"
OUT="$ROOT/target/bench"
NODE="darkcore-$POOL-linux-amd64"
rm -rf "$WORK" && mkdir -p "$WORK"
# Thousands of agent streams need as many file descriptors, in the operator and the swarm.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  kubectl delete devicepool "$POOL" --ignore-not-found --timeout=30s >/dev/null 2>&1 || true
  [ -n "${OPERATOR_PID:-}" ] && kill -TERM "$OPERATOR_PID" 2>/dev/null || true
}
trap cleanup EXIT

# Builds the release binaries and brings up the cluster and the CRD.
bench_setup() {
  # An A/B run (DARKCORE_BENCH_AGENT set) measures the binaries already built, as they are.
  if [ -z "${DARKCORE_BENCH_AGENT:-}" ]; then
    say "building release binaries"
    cargo build --release -q -p darkcore-operator -p darkcore-e2e --bins
    cargo build --profile agent-release -q -p darkcore-agent
  fi
  "$ROOT/tests/cluster/up" >/dev/null
  export KUBECONFIG="${DARKCORE_CLUSTER_DIR:-$ROOT/target/cluster}/kubeconfig"
  "$BIN/darkcore-operator" crds | kubectl apply --server-side -f - >/dev/null
  # The chart's RuntimeClasses, RBAC and namespace; the operator runs outside, as root's kubeconfig.
  helm upgrade --install darkcore "$ROOT/charts/darkcore" -n darkcore-system --create-namespace \
    --set operator.replicas=0 >/dev/null
}

# kwok, the baseline "kubelet that does no work", from Go modules (cached like the control plane).
ensure_kwok() {
  [ -x "$KWOK_BIN" ] && return
  say "building kwok $KWOK_VERSION (once)"
  mkdir -p "$(dirname "$KWOK_BIN")"
  GOBIN="$(dirname "$KWOK_BIN")" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

# Runs kwok against the cluster, managing only nodes annotated kwok.x-k8s.io/node=fake, and
# creates one such node that fits every pod the benchmark makes.
start_kwok() {
  ensure_kwok
  # A node left by an earlier kwok keeps that kwok's lease, and a new kwok waits for it to
  # expire before it acts: start from no node.
  kubectl delete node kwok-node-0 --ignore-not-found >/dev/null
  kubectl -n kube-node-lease delete lease kwok-node-0 --ignore-not-found >/dev/null
  "$KWOK_BIN" --kubeconfig "$KUBECONFIG" --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake --manage-nodes-with-label-selector= \
    --manage-single-node= --cidr=10.0.0.0/16 --node-ip=10.0.0.1 --node-lease-duration-seconds=40 \
    --server-address=127.0.0.1:0 >"$WORK/kwok.log" 2>&1 &
  pids+=($!)
  kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations: { kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0" }
  labels: { type: kwok, kubernetes.io/hostname: kwok-node-0, kubernetes.io/os: linux, kubernetes.io/arch: amd64 }
spec:
  taints: [{ key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule }]
status:
  allocatable: { cpu: "64", memory: 256Gi, pods: "2000" }
  capacity: { cpu: "64", memory: 256Gi, pods: "2000" }
YAML
  kubectl wait --for=condition=Ready node/kwok-node-0 --timeout=60s >/dev/null
}

# The operator's API writes so far, of one kind (pod_status, pod, event, node, lease, ...) or all.
writes() { curl -fsS "http://$HTTP/metrics" | awk -v kind="${1:-}" '
  $1 ~ /^darkcore_operator_api_writes_total/ && (kind == "" || index($1, "kind=\"" kind "\"")) { n += $2 } END { print n + 0 }'; }

rss_kib() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
cpu_seconds_over() { # pid seconds -> CPU seconds used in that window
  local a b; a=$(cpu_ticks "$1"); sleep "$2"; b=$(cpu_ticks "$1")
  awk -v a="$a" -v b="$b" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", (b - a) / hz }'
}

# Starts the operator (appending to $WORK/operator.log) and waits until it is ready.
start_operator() {
  # Thousands of devices join from this one address: no join limit in the way.
  "$BIN/darkcore-operator" run --http-addr "$HTTP" --gateway-addr "$GATEWAY" \
    --pool-selector "$SELECTOR" --join-rate 1000000 --join-rate-per-source 1000000 \
    "$@" >>"$WORK/operator.log" 2>&1 &
  OPERATOR_PID=$!
  until curl -fsS "http://$HTTP/readyz" >/dev/null 2>&1; do
    kill -0 "$OPERATOR_PID" 2>/dev/null || { tail -5 "$WORK/operator.log" >&2; exit 1; }
    sleep 0.1
  done
}

# Creates the pool (runtimes: $1, default process), waits for its node, and sets $token.
create_pool() {
  kubectl apply -f - >/dev/null <<YAML
apiVersion: darkcore.io/v1alpha1
kind: DevicePool
metadata: { name: $POOL, labels: { ${SELECTOR%%=*}: ${SELECTOR#*=} } }
spec: { runtimes: [${1:-process}] }
YAML
  kubectl wait --for=create "node/$NODE" --timeout=60s >/dev/null
  token=$("$BIN/darkcore-operator" token create --pool "$POOL" --uses 0 2>/dev/null)
}

# Joins and runs `count` real agents giving one core each; their pids go to agent_pids.
# AGENT_RUNTIMES (TOML list items, default "process") and REGISTRY (a plain-HTTP registry the
# agents may pull from) shape their config.
start_agents() {
  local count=$1 i dir
  agent_pids=()
  for i in $(seq 1 "$count"); do
    dir="$WORK/agent-$i"; mkdir -p "$dir"
    printf '[policy]\nmax_cores = 1\nmax_memory = "1Gi"\nruntimes = [%s]\n[policy.idle]\nmax_owner_cpu_percent = 100\n[images]\ninsecure_registries = ["%s"]\n' \
      "${AGENT_RUNTIMES:-\"process\"}" "${REGISTRY:-}" >"$dir/agent.toml"
    "$AGENT" join --server "$GATEWAY" --token "$token" --state-dir "$dir/state" --config "$dir/agent.toml" >/dev/null 2>&1
    "$AGENT" run --state-dir "$dir/state" --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 &
    pids+=($!); agent_pids+=($!)
  done
}

# N cores as the API server writes them: 1000 is 1k, 1500 stays 1500.
canonical() { local n=$1 s=""; for suffix in k M G; do [ $((n % 1000)) -eq 0 ] && [ "$n" -ne 0 ] || break; n=$((n / 1000)); s=$suffix; done; echo "$n$s"; }
wait_cpu() {
  kubectl wait --for=jsonpath="{.status.capacity.cpu}=$1" "node/$NODE" --timeout=120s >/dev/null || {
    echo "node capacity is $(kubectl get node "$NODE" -o jsonpath="{.status.capacity}"), wanted cpu=$1" >&2; exit 1; }
}
