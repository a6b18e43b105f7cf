//! One node's kubelet API routes: `/containerLogs/{ns}/{pod}/{container}` with the kubelet's
//! query options, `/exec/...`, `/attach/...` and `/portForward/...` (upgraded to SPDY), `/pods`, `/runningpods`, `/stats/summary` and
//! `/metrics/resource`, of that node's pods only. Every route authenticates and authorizes (`nodes/<subresource>` on the
//! node, as the kubelet maps its paths: proxy, stats, metrics) first.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use darkcore_proto::agent::v1::{ExecStream, PortForwardStream, StreamOpen, stream_open};
use futures::StreamExt as _;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use crate::domain::{Presence, container_id};
use crate::kubelet::KubeletState;
use crate::kubelet::auth::{Denied, User};
use crate::kubelet::follow::Follower;
use crate::kubelet::kept_output::{self, CONDITION};
use crate::kubelet::log_store::Line;
use crate::kubelet::spdy_conn;
use crate::kubelet::stats::{self, PodReadings, Reading};
use crate::kubelet::{attach, port_forward, remote_command};

/// The earliest line time (Unix nanoseconds) a logs request asks for: `sinceTime`, else
/// `sinceSeconds` before `now`. Any number a caller sends is fine: nothing overflows.
fn since_nanos(since_time: Option<&str>, since_seconds: Option<i64>, now: i64) -> Option<i64> {
    since_time
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map(|t| t.as_nanosecond().clamp(i64::MIN as i128, i64::MAX as i128) as i64)
        .or_else(|| {
            since_seconds.map(|s| now.saturating_sub(s.max(0).saturating_mul(1_000_000_000)))
        })
}

#[derive(Clone)]
struct Caller {
    state: Arc<KubeletState>,
    /// The node whose endpoint was called.
    node: Arc<str>,
    certificate: Option<User>,
}

pub fn router(state: Arc<KubeletState>, node: Arc<str>, certificate: Option<User>) -> Router {
    Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/pods", get(pods))
        .route("/pods/", get(pods))
        .route("/runningpods", get(running_pods))
        .route("/runningpods/", get(running_pods))
        .route("/stats/summary", get(stats_summary))
        .route("/metrics/resource", get(metrics_resource))
        .route("/exec/{namespace}/{pod}/{container}", get(exec).post(exec))
        .route(
            "/exec/{namespace}/{pod}/{uid}/{container}",
            get(exec).post(exec),
        )
        .route(
            "/attach/{namespace}/{pod}/{container}",
            get(attach).post(attach),
        )
        .route(
            "/attach/{namespace}/{pod}/{uid}/{container}",
            get(attach).post(attach),
        )
        .route(
            "/portForward/{namespace}/{pod}",
            get(port_forward).post(port_forward),
        )
        .route(
            "/portForward/{namespace}/{pod}/{uid}",
            get(port_forward).post(port_forward),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Caller {
            state,
            node,
            certificate,
        })
}

fn text(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// Authenticates the caller and authorizes it for `get` on `nodes/<subresource>` of the
/// called node.
async fn check(
    caller: &Caller,
    headers: &HeaderMap,
    subresource: &'static str,
) -> Result<(), Response> {
    check_verb(caller, headers, "get", subresource).await
}

/// Authenticates the caller and authorizes it for `verb` on `nodes/<subresource>` of the
/// called node (the kubelet's verb is its request's: `get` for GET, `create` for POST).
async fn check_verb(
    caller: &Caller,
    headers: &HeaderMap,
    verb: &'static str,
    subresource: &'static str,
) -> Result<(), Response> {
    let node = &*caller.node;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let authorizer = &caller.state.authorizer;
    let outcome = match authorizer
        .authenticate(caller.certificate.as_ref(), bearer)
        .await
    {
        Ok(user) => authorizer.authorize(&user, verb, subresource, node).await,
        Err(denied) => Err(denied),
    };
    outcome.map_err(|denied| match denied {
        Denied::Unauthenticated(m) => {
            text(StatusCode::UNAUTHORIZED, format!("Unauthorized: {m}\n"))
        }
        Denied::Forbidden(m) => text(StatusCode::FORBIDDEN, format!("Forbidden: {m}\n")),
    })
}

/// The kubelet's log options.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogOptions {
    pub follow: Option<String>,
    pub previous: Option<String>,
    pub timestamps: Option<String>,
    pub tail_lines: Option<i64>,
    pub since_seconds: Option<i64>,
    pub since_time: Option<String>,
    pub limit_bytes: Option<i64>,
}

fn flag(value: &Option<String>) -> bool {
    matches!(value.as_deref(), Some("true" | "1" | ""))
}

/// Lines after the cut-off time, the last `tail` of them (pure).
pub fn select(lines: Vec<Line>, since_nanos: Option<i64>, tail: Option<i64>) -> Vec<Line> {
    let mut lines: Vec<Line> = lines
        .into_iter()
        .filter(|l| since_nanos.is_none_or(|since| l.timestamp_unix_nanos >= since))
        .collect();
    if let Some(tail) = tail.filter(|t| *t >= 0) {
        let keep = (tail as usize).min(lines.len());
        lines.drain(..lines.len() - keep);
    }
    lines
}

/// A line as written: with its RFC 3339 time first when asked.
pub fn render(line: &Line, timestamps: bool) -> Vec<u8> {
    if !timestamps {
        return line.data.clone();
    }
    let stamp = Timestamp::from_nanosecond(i128::from(line.timestamp_unix_nanos))
        .unwrap_or(Timestamp::UNIX_EPOCH);
    let mut out = format!("{stamp} ").into_bytes();
    out.extend_from_slice(&line.data);
    out
}

/// What a streaming call names in its path: the pod, with its uid when the API server gives it,
/// and the container (exec and attach).
#[derive(serde::Deserialize)]
struct Target {
    namespace: String,
    pod: String,
    uid: Option<String>,
    container: Option<String>,
}

impl Target {
    /// The container named (exec and attach routes always name one).
    fn container(&self) -> &str {
        self.container.as_deref().unwrap_or_default()
    }
}

/// What exec and port-forward check before they upgrade: the caller (`nodes/proxy`, with the
/// kubelet's verb), the pod on this node (and its uid when given, and `container` when named),
/// the SPDY upgrade, and a protocol of `served`. The pod and the protocol chosen, or the answer.
async fn upgrade_checks(
    caller: &Caller,
    target: &Target,
    asked: &RequestHead,
    served: &[&'static str],
) -> Result<(Pod, &'static str), Response> {
    let Target {
        namespace,
        pod: pod_name,
        uid,
        container,
    } = target;
    let (method, headers, _) = asked;
    let verb = if method == Method::GET {
        "get"
    } else {
        "create"
    };
    check_verb(caller, headers, verb, "proxy").await?;
    let pod = match container {
        Some(container) => pod_with_container(caller, namespace, pod_name, container),
        None => pod_on_node(caller, namespace, pod_name),
    }
    .map_err(|response| *response)?;
    if uid.is_some() && uid.as_deref() != pod.metadata.uid.as_deref() {
        return Err(text(
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod_name} with that uid is not on this node\n"),
        ));
    }
    let wants = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains(token))
        })
    };
    if !wants(header::CONNECTION, "upgrade") || !wants(header::UPGRADE, "spdy/3.1") {
        return Err(text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: this is served over SPDY/3.1 (`Connection: Upgrade`, `Upgrade: SPDY/3.1`), as the API server sends it\n".into(),
        ));
    }
    let offered = headers
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok());
    let Some(protocol) = spdy_conn::negotiate(offered, served) else {
        let mut refused = text(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: this server accepts {}\n",
                served.join(", ")
            ),
        );
        for accepted in served {
            refused.headers_mut().append(
                "x-accepted-stream-protocol-versions",
                header::HeaderValue::from_static(accepted),
            );
        }
        return Err(refused);
    };
    Ok((pod, protocol))
}

/// Switches the connection to SPDY speaking `protocol`: the answer to send, and `serve` run on
/// the connection once the client has it.
fn upgrade_and_serve<F, Fut>(request: &mut Request, protocol: &'static str, serve: F) -> Response
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            serve(TokioIo::new(upgraded)).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1")
        .header("x-stream-protocol-version", protocol)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// What exec and attach find before they upgrade: the pod, the protocol, the query, the
/// streams asked for, and the running attempt of the container (its task and device).
struct Session {
    pod: Pod,
    protocol: &'static str,
    query: Vec<(String, String)>,
    options: remote_command::Options,
    task_id: String,
    device: String,
}

/// A request's method, headers and query, owned: its body is not Sync, so the request may not
/// be borrowed across the checks' awaits.
type RequestHead = (Method, HeaderMap, String);

fn head_of(request: &Request) -> RequestHead {
    let query = request.uri().query().unwrap_or("").to_owned();
    (request.method().clone(), request.headers().clone(), query)
}

/// Checks an exec or attach (`verb`, for messages) as [`upgrade_checks`] does, then its
/// options, and that the container is running.
async fn session_checks(
    caller: &Caller,
    target: &Target,
    asked: RequestHead,
    verb: &str,
) -> Result<Session, Response> {
    let query: Vec<(String, String)> = serde_urlencoded::from_str(&asked.2).unwrap_or_default();
    let (pod, protocol) = upgrade_checks(caller, target, &asked, remote_command::PROTOCOLS).await?;
    let options = remote_command::Options::from_query(&query)
        .map_err(|why| text(StatusCode::BAD_REQUEST, format!("{why}\n")))?;
    let container = target.container();
    let Some((task_id, device)) = container_id::running_attempt(&pod, container) else {
        let (namespace, pod_name) = (&target.namespace, &target.pod);
        return Err(text(
            StatusCode::BAD_REQUEST,
            format!(
                "container {container} in pod {namespace}/{pod_name} is not running; {verb} needs a running container\n"
            ),
        ));
    };
    Ok(Session {
        pod,
        protocol,
        query,
        options,
        task_id,
        device,
    })
}

/// `kubectl exec`: checks the caller, the pod and the request, then upgrades the connection to
/// SPDY and carries the session to the device running the container.
async fn exec(
    State(caller): State<Caller>,
    Path(target): Path<Target>,
    mut request: Request,
) -> Response {
    let session = match session_checks(&caller, &target, head_of(&request), "exec").await {
        Ok(session) => session,
        Err(response) => return response,
    };
    let command = remote_command::command_of(&session.query);
    if command.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "no command to run: give one after `--`, as in `kubectl exec POD -- sh`\n".into(),
        );
    }
    let Session {
        protocol,
        options,
        task_id,
        device,
        ..
    } = session;
    let state = caller.state.clone();
    upgrade_and_serve(&mut request, protocol, move |io| async move {
        let open = StreamOpen {
            stream_id: String::new(),
            task_id,
            container: target.container().to_owned(),
            kind: Some(stream_open::Kind::Exec(ExecStream {
                command,
                stdin: options.stdin,
                stdout: options.stdout,
                stderr: options.stderr,
                tty: options.tty,
            })),
        };
        let device_end = state.streams.open(&state.registry, &device, open);
        remote_command::serve(io, options, device_end).await;
    })
}

/// `kubectl attach`: checks as exec does, then shows the container's output from now until its
/// run ends. A container started with `stdin: true` is refused stdin: darkcore gives every
/// container an empty stdin, so there is nothing to attach it to.
async fn attach(
    State(caller): State<Caller>,
    Path(target): Path<Target>,
    mut request: Request,
) -> Response {
    let session = match session_checks(&caller, &target, head_of(&request), "attach").await {
        Ok(session) => session,
        Err(response) => return response,
    };
    let Target {
        namespace,
        pod: pod_name,
        container,
        ..
    } = target;
    let container = container.unwrap_or_default();
    let declares_stdin = session
        .pod
        .spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .any(|c| c.name == container && c.stdin == Some(true));
    if session.options.stdin && declares_stdin {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "container {container} asks for stdin (stdin: true), but darkcore gives containers an empty stdin: attach shows only output here, so run `kubectl attach` without -i, or use `kubectl exec -i {pod_name} -- COMMAND` to send input\n"
            ),
        );
    }
    let uid = session.pod.metadata.uid.clone().unwrap_or_default();
    let follower = Follower::from_now(caller.state.clone(), uid, container, (namespace, pod_name));
    let options = session.options;
    upgrade_and_serve(&mut request, session.protocol, move |io| async move {
        let output = attach::output_from_now(follower, options.tty);
        remote_command::serve(io, options, async { Ok(output) }).await;
    })
}

/// `kubectl port-forward`: checks as exec does, then upgrades and carries each forwarded
/// connection to the device, which connects to the port inside the pod.
async fn port_forward(
    State(caller): State<Caller>,
    Path(target): Path<Target>,
    mut request: Request,
) -> Response {
    let served = &[port_forward::PROTOCOL];
    let (pod, protocol) = match upgrade_checks(&caller, &target, &head_of(&request), served).await {
        Ok(checked) => checked,
        Err(response) => return response,
    };
    let Target {
        namespace,
        pod: pod_name,
        ..
    } = target;
    let Some((task_id, device, container)) = container_id::any_running_attempt(&pod) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "pod {namespace}/{pod_name} has no running container; port-forward needs one\n"
            ),
        );
    };
    let state = caller.state.clone();
    upgrade_and_serve(&mut request, protocol, move |io| async move {
        let open: port_forward::Opener = Arc::new(move |port| {
            let state = state.clone();
            let open = StreamOpen {
                stream_id: String::new(),
                task_id: task_id.clone(),
                container: container.clone(),
                kind: Some(stream_open::Kind::PortForward(PortForwardStream {
                    port: u32::from(port),
                })),
            };
            let device = device.clone();
            Box::pin(async move { state.streams.open(&state.registry, &device, open).await })
        });
        port_forward::serve(io, open).await;
    })
}

/// Pod `namespace/name` on the called node; else the answer.
fn pod_on_node(caller: &Caller, namespace: &str, pod_name: &str) -> Result<Pod, Box<Response>> {
    let state = &caller.state;
    let pod = state.pods.get(namespace, pod_name).filter(|pod| {
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&*caller.node)
    });
    pod.ok_or_else(|| {
        Box::new(if !state.pods.listed() {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the darkcore operator has just started and has not listed its pods yet; try again in a moment\n".into(),
            )
        } else {
            text(
                StatusCode::NOT_FOUND,
                format!("pod {namespace}/{pod_name} is not on node {}\n", caller.node),
            )
        })
    })
}

/// Pod `namespace/name` on the called node, with a container `container`; else the answer.
fn pod_with_container(
    caller: &Caller,
    namespace: &str,
    pod_name: &str,
    container: &str,
) -> Result<Pod, Box<Response>> {
    let pod = pod_on_node(caller, namespace, pod_name)?;
    let known = pod
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
        .any(|c| c.name == container);
    if !known {
        return Err(Box::new(text(
            StatusCode::NOT_FOUND,
            format!("container {container} is not in pod {namespace}/{pod_name}\n"),
        )));
    }
    Ok(pod)
}

async fn container_logs(
    State(caller): State<Caller>,
    Path((namespace, pod_name, container)): Path<(String, String, String)>,
    Query(options): Query<LogOptions>,
    headers: HeaderMap,
) -> Response {
    let state = caller.state.clone();
    // Check access before saying whether the pod exists.
    if let Err(denied) = check(&caller, &headers, "proxy").await {
        return denied;
    }
    let pod = match pod_with_container(&caller, &namespace, &pod_name, &container) {
        Ok(pod) => pod,
        Err(response) => return *response,
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let shown = shown_state(&pod, &container);
    let previous = match which_run(flag(&options.previous), &shown) {
        Ok(previous) => previous,
        Err(why) => return text(StatusCode::BAD_REQUEST, why.message(&container, &pod_name)),
    };
    let Some(mut first) = state.logs.read(&uid, &container, previous, 0) else {
        let missing = Missing::Previous.message(&container, &pod_name);
        return text(StatusCode::BAD_REQUEST, missing);
    };
    // A run that ended before this operator saw it start: its output is gone unless the pod
    // kept all of it as it finished, and printing what is left (or nothing) would pass for
    // all of it.
    if !first.whole && (first.ended || previous || shown.terminated) {
        match kept_output::kept(&pod, &container).filter(|_| !previous && shown.terminated) {
            Some(kept) if kept.whole => {
                first.lines = kept.to_lines();
                first.ended = true;
            }
            kept => {
                let missing = Missing::Gone {
                    tail_kept: kept.is_some_and(|k| !k.lines.is_empty()),
                };
                return text(
                    StatusCode::BAD_REQUEST,
                    missing.message(&container, &pod_name),
                );
            }
        }
    }
    let now = Timestamp::now().as_nanosecond() as i64;
    let since = since_nanos(options.since_time.as_deref(), options.since_seconds, now);
    let timestamps = flag(&options.timestamps);
    let mut budget = options.limit_bytes.filter(|l| *l > 0).map(|l| l as usize);
    let mut take = move |lines: Vec<Line>| -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        for line in lines {
            let rendered = render(&line, timestamps);
            if let Some(left) = budget.as_mut() {
                if rendered.len() >= *left {
                    out.extend_from_slice(&rendered[..*left]);
                    *left = 0;
                    return (out, true);
                }
                *left -= rendered.len();
            }
            out.extend_from_slice(&rendered);
        }
        (out, false)
    };
    let (body, exhausted) = take(select(first.lines, since, options.tail_lines));
    let plain = [(header::CONTENT_TYPE, "text/plain")];
    if !flag(&options.follow) || previous || exhausted || first.ended {
        return (plain, body).into_response();
    }
    // Follow: what is there now, then new lines as they come, until the run ends.
    let follower = Follower {
        state,
        uid,
        container,
        namespace,
        pod_name,
        from: first.next,
    };
    let rest = futures::stream::unfold(Some((follower, take)), move |followed| async move {
        let (mut follower, mut take) = followed?;
        let lines = follower.next().await?;
        let (body, exhausted) = take(select(lines, since, None));
        let followed = (!exhausted).then_some((follower, take));
        Some((Ok::<Bytes, Infallible>(Bytes::from(body)), followed))
    });
    let stream = futures::stream::once(async move { Ok(Bytes::from(body)) }).chain(rest);
    (plain, Body::from_stream(stream)).into_response()
}

/// What the pod's status shows of a container, as far as its logs go.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shown {
    pub running: bool,
    pub terminated: bool,
    /// Waiting, with this reason.
    pub waiting: Option<String>,
    /// A run before this one has ended (`lastState.terminated`).
    pub last_terminated: bool,
}

fn shown_state(pod: &Pod, container: &str) -> Shown {
    let status = pod.status.as_ref().and_then(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
            .find(|c| c.name == container)
    });
    let Some(status) = status else {
        return Shown {
            waiting: Some("ContainerCreating".into()),
            ..Default::default()
        };
    };
    let state = status.state.clone().unwrap_or_default();
    Shown {
        running: state.running.is_some(),
        terminated: state.terminated.is_some(),
        waiting: state
            .waiting
            .map(|w| w.reason.unwrap_or_else(|| "ContainerCreating".into())),
        last_terminated: status
            .last_state
            .as_ref()
            .is_some_and(|s| s.terminated.is_some()),
    }
}

/// Why a container's logs cannot be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// It has not run yet, waiting for this reason.
    Waiting(String),
    /// `--previous`, and no run before this one has ended.
    Previous,
    /// It ran before this operator started, and its output went with the operator before;
    /// `tail_kept`: its last lines are on the pod.
    Gone { tail_kept: bool },
}

impl Missing {
    fn message(&self, container: &str, pod: &str) -> String {
        match self {
            Missing::Waiting(reason) => format!(
                "container \"{container}\" in pod \"{pod}\" is waiting to start: {reason}\n"
            ),
            Missing::Previous => format!(
                "previous terminated container \"{container}\" in pod \"{pod}\" not found\n"
            ),
            Missing::Gone { tail_kept: false } => format!(
                "the output of container \"{container}\" in pod \"{pod}\" is gone: that run began before the darkcore operator last restarted, and the operator keeps output only in memory (a failed container with terminationMessagePolicy: FallbackToLogsOnError keeps its last lines in its termination message)\n"
            ),
            Missing::Gone { tail_kept: true } => format!(
                "the output of container \"{container}\" in pod \"{pod}\" is gone but for its last lines: that run began before the darkcore operator last restarted, and the operator keeps output only in memory; the end it kept is in the pod's {CONDITION} condition (kubectl get pod {pod} -o jsonpath='{{.status.conditions[?(@.type==\"{CONDITION}\")].message}}')\n"
            ),
        }
    }
}

/// Which run a logs request reads, as the kubelet picks it: `--previous` is the run
/// `lastState` describes; without it, the current run, or, while the container waits to
/// restart, the run that just ended (also `lastState`'s). `Ok(true)`: the previous run.
pub fn which_run(previous: bool, shown: &Shown) -> Result<bool, Missing> {
    match (previous, shown) {
        (true, s) if !s.last_terminated => Err(Missing::Previous),
        (true, _) => Ok(true),
        (false, s) if s.running || s.terminated => Ok(false),
        (false, s) if s.last_terminated => Ok(true),
        (false, s) => Err(Missing::Waiting(s.waiting.clone().unwrap_or_default())),
    }
}

fn pod_list(pods: Vec<Pod>) -> Response {
    let list =
        serde_json::json!({ "kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods });
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&list).unwrap_or_default(),
    )
        .into_response()
}

/// The node's pods with the readings of their current attempts, and the node's CPU so far.
fn node_readings(caller: &Caller, now_unix_ms: i64) -> (Vec<PodReadings>, u64) {
    let state = &caller.state;
    let pods: Vec<PodReadings> = state
        .pods
        .on_node(&caller.node)
        .into_iter()
        .filter_map(|pod| {
            let (task_id, device) = container_id::recorded_attempt(&pod)?;
            let status = pod.status.as_ref()?;
            let live = status.phase.as_deref() == Some("Running")
                && matches!(state.registry.presence(&device), Presence::Online);
            let containers = state.stats.of(&task_id, now_unix_ms, live);
            Some(PodReadings {
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                start_time: status.start_time.as_ref().map(|t| t.0.to_string()),
                task_id,
                containers,
            })
        })
        .filter(|p| !p.containers.is_empty())
        .collect();
    let shown: Vec<(String, String, Reading)> = pods
        .iter()
        .flat_map(|p| (p.containers.iter()).map(|(name, r)| (p.task_id.clone(), name.clone(), *r)))
        .collect();
    let node_cpu = state.stats.node_cpu_ns(&caller.node, &shown);
    (pods, node_cpu)
}

/// `/stats/summary`, as `kubectl top` (through metrics-server) and autoscalers read it.
async fn stats_summary(State(caller): State<Caller>, headers: HeaderMap) -> Response {
    if let Err(denied) = check(&caller, &headers, "stats").await {
        return denied;
    }
    let now = crate::domain::unix_ms();
    let (pods, node_cpu) = node_readings(&caller, now);
    let body = stats::summary(
        &caller.node,
        caller.state.started_unix_ms,
        node_cpu,
        &pods,
        now,
    );
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&body).unwrap_or_default(),
    )
        .into_response()
}

/// `/metrics/resource`, as metrics-server reads it.
async fn metrics_resource(State(caller): State<Caller>, headers: HeaderMap) -> Response {
    if let Err(denied) = check(&caller, &headers, "metrics").await {
        return denied;
    }
    let now = crate::domain::unix_ms();
    let (pods, node_cpu) = node_readings(&caller, now);
    let body = stats::resource_metrics(node_cpu, &pods, now);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn pods(State(caller): State<Caller>, headers: HeaderMap) -> Response {
    if let Err(denied) = check(&caller, &headers, "proxy").await {
        return denied;
    }
    pod_list(caller.state.pods.on_node(&caller.node))
}

async fn running_pods(
    State(caller): State<Caller>,
    headers: HeaderMap,
    Query(_): Query<HashMap<String, String>>,
) -> Response {
    if let Err(denied) = check(&caller, &headers, "proxy").await {
        return denied;
    }
    let running = caller
        .state
        .pods
        .on_node(&caller.node)
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| {
            let mut slim = Pod::default();
            slim.metadata.name = p.metadata.name;
            slim.metadata.namespace = p.metadata.namespace;
            slim.metadata.uid = p.metadata.uid;
            slim.spec = p.spec.map(|s| k8s_openapi::api::core::v1::PodSpec {
                containers: s
                    .containers
                    .into_iter()
                    .map(|c| k8s_openapi::api::core::v1::Container {
                        name: c.name,
                        image: c.image,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
            slim
        })
        .collect();
    pod_list(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at: i64, text: &str) -> Line {
        Line {
            timestamp_unix_nanos: at,
            data: text.as_bytes().to_vec(),
            stderr: false,
        }
    }

    #[test]
    fn since_never_overflows_whatever_a_caller_sends() {
        let now = 1_700_000_000_000_000_000;
        assert_eq!(since_nanos(None, Some(10), now), Some(now - 10_000_000_000));
        assert_eq!(since_nanos(None, Some(i64::MAX), now), Some(now - i64::MAX));
        assert_eq!(since_nanos(None, Some(-5), now), Some(now));
        assert_eq!(since_nanos(None, None, now), None);
        assert_eq!(
            since_nanos(Some("2024-01-01T00:00:00Z"), Some(10), now),
            Some(1_704_067_200_000_000_000)
        );
    }

    #[test]
    fn tail_and_since_pick_the_lines() {
        let lines = vec![line(1, "a\n"), line(2, "b\n"), line(3, "c\n")];
        assert_eq!(
            select(lines.clone(), None, Some(2)),
            vec![line(2, "b\n"), line(3, "c\n")]
        );
        assert_eq!(select(lines.clone(), Some(3), None), vec![line(3, "c\n")]);
        assert_eq!(select(lines, None, Some(0)), vec![]);
    }

    #[test]
    fn the_run_read_is_the_one_the_kubelet_would_pick() {
        let running = Shown {
            running: true,
            ..Default::default()
        };
        assert_eq!(which_run(false, &running), Ok(false));
        assert_eq!(which_run(true, &running), Err(Missing::Previous));
        // Crashed once, waiting to restart: both read the run that crashed.
        let backing_off = Shown {
            waiting: Some("CrashLoopBackOff".into()),
            last_terminated: true,
            ..Default::default()
        };
        assert_eq!(which_run(false, &backing_off), Ok(true));
        assert_eq!(which_run(true, &backing_off), Ok(true));
        let creating = Shown {
            waiting: Some("ContainerCreating".into()),
            ..Default::default()
        };
        assert_eq!(
            which_run(false, &creating),
            Err(Missing::Waiting("ContainerCreating".into()))
        );
        let done = Shown {
            terminated: true,
            ..Default::default()
        };
        assert_eq!(which_run(false, &done), Ok(false));
        assert!(
            Missing::Gone { tail_kept: false }
                .message("main", "pi-0")
                .contains("is gone")
        );
        assert!(
            Missing::Gone { tail_kept: true }
                .message("main", "pi-0")
                .contains("darkcore.io/Output")
        );
    }

    #[test]
    fn timestamps_are_rfc3339_before_the_line() {
        let rendered = render(&line(1_700_000_000_123_456_789, "x\n"), true);
        assert_eq!(
            String::from_utf8(rendered).unwrap(),
            "2023-11-14T22:13:20.123456789Z x\n"
        );
    }
}
