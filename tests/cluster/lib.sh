# Shared by tests/cluster/{build,up,down}: pinned versions, where things live, and how a
# failing step reports itself. Source it; it defines variables and functions only.

CLUSTER_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CLUSTER_SCRIPTS/../.." && pwd)"
# shellcheck source=versions.env
. "$CLUSTER_SCRIPTS/versions.env"

DARKCORE_CACHE="${DARKCORE_CACHE:-$HOME/.cache/darkcore}"
CLUSTER_DIR="${DARKCORE_CLUSTER_DIR:-$REPO_ROOT/target/cluster}"
# The cluster's CA and certificates (tests/cluster/up makes them).
PKI="$CLUSTER_DIR/pki"
K8S_BIN="$DARKCORE_CACHE/k8s-$K8S_VERSION"
ETCD_BIN="$DARKCORE_CACHE/etcd-$ETCD_VERSION"
HELM_BIN="$DARKCORE_CACHE/helm-$HELM_VERSION"
BUILD_LOGS="$DARKCORE_CACHE/build-logs"
# Built together from one wrapper module. kubectl is built too because Debian's is 1.20, far
# out of version skew; a kubectl already on PATH still wins, ours is appended.
K8S_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubectl"
# The real node's own binaries (tests/cluster/node), apart so the control plane needs none of them.
K8S_NODE_BIN="$DARKCORE_CACHE/k8s-node-$K8S_VERSION"
K8S_NODE_COMMANDS="kubelet kube-proxy"
METRICS_SERVER_BIN="$DARKCORE_CACHE/metrics-server-$METRICS_SERVER_VERSION"
export PATH="$PATH:$K8S_BIN"

log() { printf '[cluster] %s\n' "$*" >&2; }

# fail STEP LOGFILE: say which step failed and where to look, then exit.
fail() {
  printf '[cluster] FAILED at step "%s". Read %s\n' "$1" "$2" >&2
  if [ -f "$2" ]; then
    printf '[cluster] last lines of %s:\n' "$2" >&2
    tail -n 25 "$2" | sed 's/^/    /' >&2
  fi
  exit 1
}

# run_step NAME LOGFILE CMD...: run CMD with its output in LOGFILE; on failure, fail loudly.
run_step() {
  local name="$1" logfile="$2"
  shift 2
  mkdir -p "$(dirname "$logfile")"
  log "$name (log: $logfile)"
  "$@" >"$logfile" 2>&1 || fail "$name" "$logfile"
}

# Go builds: pinned versions, the machine's own toolchain, caches outside the clone.
go_env() {
  export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
}

# --- free ports on loopback, and processes started in the background ------------------------
# free_port runs in a subshell ($(free_port)): add what it gave to `taken` before asking again.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
taken=" "
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 30000))
    case "$taken" in *" $p "*) continue ;; esac
    if ! port_in_use "$p"; then
      taken="$taken$p "
      echo "$p"
      return
    fi
  done
}
# start NAME CMD...: run CMD detached, its output in $LOGS/NAME.log, its pid in $PIDS/NAME.pid
# (each script sets PIDS and LOGS to its own folders).
start() {
  local name="$1"
  shift
  log "start $name (log: $LOGS/$name.log)"
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

# wait_for WHAT LOG SECONDS CMD...: poll CMD until it succeeds; fail if a process of $PIDS died.
wait_for() {
  local what="$1" logfile="$2" seconds="$3"
  shift 3
  local deadline=$((SECONDS + seconds)) pidfile
  until "$@" >/dev/null 2>&1; do
    for pidfile in "$PIDS"/*.pid; do
      [ -f "$pidfile" ] || continue
      kill -0 "$(cat "$pidfile")" 2>/dev/null ||
        fail "wait for $what: $(basename "$pidfile" .pid) exited" "$LOGS/$(basename "$pidfile" .pid).log"
    done
    [ $SECONDS -lt $deadline ] || fail "wait for $what (${seconds}s)" "$logfile"
    sleep 0.5
  done
}

# stop_pid NAME: stop the process of $PIDS/NAME.pid, TERM then KILL after 10 s, and forget it.
stop_pid() {
  local pidfile="$PIDS/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    log "stop $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# apt_install LOG PACKAGE...: installs the packages from Debian, its output in LOG; nothing
# when no package is given.
apt_install() {
  local logfile="$1"
  shift
  [ $# -gt 0 ] || return 0
  run_step "install $* from Debian" "$logfile" \
    bash -c "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $*"
}

# --- certificates and kubeconfigs --------------------------------------------------------------
# sign CA NAME SUBJECT USAGE [SAN]: in the current folder, a key NAME.key and a certificate
# NAME.crt for SUBJECT, signed by CA.crt and CA.key (CA: their path without the extension), for
# USAGE (extendedKeyUsage), with subjectAltName SAN when given.
sign() {
  local ca="$1" name="$2" subject="$3" usage="$4" san="${5:-}" ext
  ext=$(mktemp)
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' "$usage" >"$ext"
  [ -n "$san" ] && printf 'subjectAltName=%s\n' "$san" >>"$ext"
  openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subject"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -days 3650 \
    -out "$name.crt" -extfile "$ext"
  rm -f "$ext" "$name.csr"
}

# write_kubeconfig FILE SERVER USER CERT: a kubeconfig for the API server at SERVER, trusting
# the cluster's CA, as USER with the certificate CERT.crt and CERT.key (embedded).
write_kubeconfig() {
  local file="$1" server="$2" user="$3" cert="$4"
  kubectl config --kubeconfig "$file" set-cluster darkcore-test --server "$server" \
    --certificate-authority "$PKI/ca.crt" --embed-certs >/dev/null
  kubectl config --kubeconfig "$file" set-credentials "$user" \
    --client-certificate "$cert.crt" --client-key "$cert.key" --embed-certs >/dev/null
  kubectl config --kubeconfig "$file" set-context darkcore-test --cluster darkcore-test --user "$user" >/dev/null
  kubectl config --kubeconfig "$file" use-context darkcore-test >/dev/null
  chmod 600 "$file"
}
