//! Users' streams into this device's containers (`kubectl exec`): the operator asks with
//! `StreamOpen`, and the agent answers with an `OpenStream` call on its own connection.
//!
//! Each stream runs on its own task, so a slow one holds back neither heartbeats nor others;
//! HTTP/2 flow control holds back its output when the user reads slowly.

use std::os::fd::OwnedFd;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use darkcore_proto::agent::v1::agent_gateway_client::AgentGatewayClient;
use darkcore_proto::agent::v1::{
    ExecStream, StreamDown, StreamEnd, StreamOpen, StreamUp, TerminalSize, stream_down, stream_end,
    stream_open, stream_up,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::tasks::enter::{Entrance, Entrances, stdio};

/// Bytes read from a command's output at once: one message each.
const CHUNK: usize = 32 * 1024;
/// Messages queued toward the operator on one stream (HTTP/2 holds a window more).
const UP_QUEUE: usize = 2;
/// How long a port-forward may take to connect to the pod's port.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a finished stream waits for the operator to close its side.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Streams open on this agent now, bounded as the operator bounds them per device.
#[derive(Default)]
pub struct OpenStreams {
    count: Arc<AtomicUsize>,
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OpenStreams {
    fn take(&self) -> Option<Slot> {
        let taken = self.count.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(self.count.clone());
        (taken < darkcore_proto::MAX_STREAMS_PER_DEVICE).then_some(slot)
    }
}

fn up(body: stream_up::Body) -> StreamUp {
    StreamUp { body: Some(body) }
}

fn failure(message: impl Into<String>) -> stream_end::Result {
    stream_end::Result::Failure(message.into())
}

/// Answers `open`: calls OpenStream and runs what it asks, on a task of its own.
pub fn open(
    client: AgentGatewayClient<Channel>,
    open: StreamOpen,
    entrances: &Entrances,
    streams: &OpenStreams,
) {
    let entrance = entrances.get(&open.task_id, &open.container);
    let slot = streams.take();
    tokio::spawn(async move {
        let (to_operator, outbound) = mpsc::channel(UP_QUEUE);
        let _ = to_operator
            .send(up(stream_up::Body::StreamId(open.stream_id.clone())))
            .await;
        let mut client = client;
        let down = match client.open_stream(ReceiverStream::new(outbound)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::warn!(stream = %open.stream_id, error = %status.message(), "could not open a stream the operator asked for");
                return;
            }
        };
        let refused = |why: String, down| (failure(why), tokio::spawn(drain(down)));
        use stream_open::Kind;
        let (result, user_side) = match (slot, open.kind, entrance) {
            (None, _, _) => refused(
                format!(
                    "this device already carries {} streams; close one and try again",
                    darkcore_proto::MAX_STREAMS_PER_DEVICE
                ),
                down,
            ),
            (Some(_), None, _) => refused(
                "this agent does not know the kind of stream asked for; upgrade it".into(),
                down,
            ),
            (Some(_), Some(_), None) => refused(
                format!(
                    "container {} of task {} is not running on this device",
                    open.container, open.task_id
                ),
                down,
            ),
            (Some(_slot), Some(Kind::Exec(exec)), Some(entrance)) => {
                run_exec(&entrance, exec, &to_operator, down).await
            }
            (Some(_slot), Some(Kind::PortForward(forward)), Some(entrance)) => {
                run_port_forward(&entrance, forward.port, &to_operator, down).await
            }
        };
        tracing::info!(stream = %open.stream_id, task = %open.task_id, container = %open.container, ?result, "stream ended");
        let end = StreamEnd {
            result: Some(result),
        };
        let _ = to_operator.send(up(stream_up::Body::End(end))).await;
        drop(to_operator);
        // The call lives while its response does: it ends once the operator has read the end
        // and closed its side (or after a while), never before the end is sent.
        let _ = tokio::time::timeout(CLOSE_WAIT, user_side).await;
    });
}

/// The exit code `kubectl` reports for a command that ended with `status`.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

/// A pseudo-terminal for `-t`: the command's stdin, stdout and stderr are its follower side;
/// the agent reads and writes the leader, and sets its size.
struct Terminal {
    leader: OwnedFd,
    follower: OwnedFd,
}

impl Terminal {
    fn open() -> std::io::Result<Terminal> {
        use rustix::pty::{OpenptFlags, grantpt, ioctl_tiocgptpeer, openpt, unlockpt};
        let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let leader = openpt(flags)?;
        grantpt(&leader)?;
        unlockpt(&leader)?;
        let follower = ioctl_tiocgptpeer(&leader, flags)?;
        Ok(Terminal { leader, follower })
    }

    fn follower(&self) -> std::io::Result<Stdio> {
        Ok(Stdio::from(self.follower.try_clone()?))
    }
}

type Input = Box<dyn AsyncWrite + Unpin + Send>;
type Output = Box<dyn AsyncRead + Unpin + Send>;

/// The command's stdio as the agent holds it: where input goes, where output comes from,
/// and the terminal to resize, if any.
struct Held {
    input: Option<Input>,
    stdout: Option<Output>,
    stderr: Option<Output>,
    terminal: Option<OwnedFd>,
}

/// Starts `exec` through `entrance`, with pipes where the user asked for a stream, or with a
/// terminal for `-t` (which a runner relays to the container's own).
async fn spawn(
    entrance: &Entrance,
    exec: &ExecStream,
) -> Result<(tokio::process::Child, Held), String> {
    let starting = |e: std::io::Error| format!("starting {:?}: {e}", exec.command[0]);
    if !exec.tty {
        let mut command = entrance.command(&exec.command, false)?;
        command
            .stdin(stdio(exec.stdin))
            .stdout(stdio(exec.stdout))
            .stderr(stdio(exec.stderr))
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(starting)?;
        let held = Held {
            input: child.stdin.take().map(|i| Box::new(i) as Input),
            stdout: child.stdout.take().map(|o| Box::new(o) as Output),
            stderr: child.stderr.take().map(|o| Box::new(o) as Output),
            terminal: None,
        };
        return Ok((child, held));
    }
    let terminal = Terminal::open().map_err(|e| format!("opening a terminal: {e}"))?;
    let mut command = entrance.command(&exec.command, true)?;
    let follower = || terminal.follower().map_err(starting);
    command
        .stdin(follower()?)
        .stdout(follower()?)
        .stderr(follower()?)
        .kill_on_drop(true);
    let child = command.spawn().map_err(starting)?;
    // The command holds the only follower now: its end is the leader's end.
    drop(command);
    let Terminal { leader, follower } = terminal;
    drop(follower);
    let file = |fd: &OwnedFd| -> Result<tokio::fs::File, String> {
        let copy = fd.try_clone().map_err(|e| format!("the terminal: {e}"))?;
        Ok(tokio::fs::File::from_std(std::fs::File::from(copy)))
    };
    let held = Held {
        input: if exec.stdin {
            Some(Box::new(file(&leader)?))
        } else {
            None
        },
        stdout: Some(Box::new(file(&leader)?)),
        stderr: None,
        terminal: Some(leader),
    };
    Ok((child, held))
}

/// Runs `exec` through `entrance`, carrying its stdio, until it exits and its output ends.
/// Returns how it ended, and the task that holds the user's side (the call's response).
async fn run_exec(
    entrance: &Entrance,
    exec: ExecStream,
    to_operator: &mpsc::Sender<StreamUp>,
    down: Streaming<StreamDown>,
) -> (stream_end::Result, tokio::task::JoinHandle<()>) {
    let (mut child, held) = match spawn(entrance, &exec).await {
        Ok(spawned) => spawned,
        Err(why) => return (failure(why), tokio::spawn(drain(down))),
    };
    let group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let (input, mut user_gone) = user_side(down, held.input, held.terminal);
    let stdout = pump(held.stdout, to_operator.clone(), stream_up::Body::Stdout);
    let stderr = pump(held.stderr, to_operator.clone(), stream_up::Body::Stderr);
    let ran = async {
        let (status, _, _) = tokio::join!(child.wait(), stdout, stderr);
        status
    };
    let finished = tokio::select! {
        status = ran => Some(status),
        _ = &mut user_gone => None,
    };
    let result = match finished {
        Some(Ok(status)) => stream_end::Result::ExitCode(exit_code(status)),
        Some(Err(e)) => failure(format!("waiting for the command: {e}")),
        None => {
            // The user went away: nothing is left to read the command's output. A runner's
            // exec and a terminal's session lead their own groups, which hold what they started.
            let own_group = exec.tty || matches!(entrance, Entrance::Runner { .. });
            if let Some(group) = group.filter(|_| own_group) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.start_kill();
            failure("the user's stream closed")
        }
    };
    (result, input)
}

/// Connects to `port` inside `entrance`'s network namespace and carries bytes both ways until
/// the port's side closes. Returns how it ended, and the task that holds the user's side.
async fn run_port_forward(
    entrance: &Entrance,
    port: u32,
    to_operator: &mpsc::Sender<StreamUp>,
    down: Streaming<StreamDown>,
) -> (stream_end::Result, tokio::task::JoinHandle<()>) {
    let connected = match (entrance.network(), u16::try_from(port)) {
        (Err(why), _) => Err(why),
        (_, Err(_)) | (_, Ok(0)) => Err(format!("{port} is not a port")),
        (Ok(network), Ok(port)) => connect_inside(network.to_path_buf(), port)
            .await
            .map_err(|e| format!("connecting to port {port} in the pod: {e}")),
    };
    let socket = match connected {
        Ok(socket) => socket,
        Err(why) => return (failure(why), tokio::spawn(drain(down))),
    };
    let (from_port, to_port) = socket.into_split();
    let (input, mut user_gone) = user_side(down, Some(Box::new(to_port)), None);
    let carried = pump(
        Some(Box::new(from_port)),
        to_operator.clone(),
        stream_up::Body::Stdout,
    );
    let result = tokio::select! {
        () = carried => stream_end::Result::ExitCode(0),
        _ = &mut user_gone => failure("the user's stream closed"),
    };
    (result, input)
}

/// A TCP connection to `port` on the loopback of the network namespace at `network`, made
/// from a thread of its own that enters the namespace and ends (no other thread changes).
async fn connect_inside(
    network: std::path::PathBuf,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let (done, connected) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let attempt = || -> std::io::Result<std::net::TcpStream> {
            let namespace = std::fs::File::open(&network)?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&namespace),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
            std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT)
                .or_else(|_| std::net::TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT))
        };
        let _ = done.send(attempt());
    });
    let socket = connected
        .await
        .map_err(|_| std::io::Error::other("the connecting thread ended"))??;
    socket.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(socket)
}

/// The user's side on a task of its own (a command that does not read its input must not
/// stop its output from being read): the task, and what says the user has gone.
fn user_side(
    down: Streaming<StreamDown>,
    input: Option<Input>,
    terminal: Option<OwnedFd>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (gone, user_gone) = tokio::sync::oneshot::channel();
    (
        tokio::spawn(feed_stdin(down, input, terminal, gone)),
        user_gone,
    )
}

/// Reads the user's side until it closes, keeping the call open meanwhile.
async fn drain(mut down: Streaming<StreamDown>) {
    while let Ok(Some(_)) = down.message().await {}
}

/// Copies the user's input to the command (its stdin, or its terminal) and applies terminal
/// resizes; says when the user's side is gone.
async fn feed_stdin(
    mut down: Streaming<StreamDown>,
    mut input: Option<Input>,
    terminal: Option<OwnedFd>,
    user_gone: tokio::sync::oneshot::Sender<()>,
) {
    loop {
        match down.message().await {
            Ok(Some(StreamDown { body: Some(body) })) => match body {
                stream_down::Body::Stdin(data) => {
                    if let Some(pipe) = input.as_mut()
                        && (pipe.write_all(&data).await.is_err() || pipe.flush().await.is_err())
                    {
                        // The command closed its stdin; the rest of the input has nowhere to go.
                        input = None;
                    }
                }
                // The end of input: closes a pipe; a terminal stays, as kubectl's does.
                stream_down::Body::StdinClosed(_) => {
                    if terminal.is_none() {
                        input = None;
                    }
                }
                stream_down::Body::Resize(size) => {
                    if let Some(terminal) = &terminal {
                        let _ = rustix::termios::tcsetwinsize(terminal, window(&size));
                    }
                }
            },
            Ok(Some(StreamDown { body: None })) => {}
            Ok(None) | Err(_) => {
                let _ = user_gone.send(());
                return;
            }
        }
    }
}

/// A terminal size as the kernel takes it; sizes past what a terminal can have are capped.
fn window(size: &TerminalSize) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: size.height.min(u32::from(u16::MAX)) as u16,
        ws_col: size.width.min(u32::from(u16::MAX)) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Sends what `output` writes, chunk by chunk, until it ends.
async fn pump(
    output: Option<Output>,
    to_operator: mpsc::Sender<StreamUp>,
    wrap: fn(Vec<u8>) -> stream_up::Body,
) {
    let Some(mut output) = output else {
        return;
    };
    let mut buffer = vec![0u8; CHUNK];
    loop {
        match output.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to_operator
                    .send(up(wrap(buffer[..n].to_vec())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_reported_as_the_kubelet_does() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137, "killed by SIGKILL");
    }

    /// With `-t`, the command runs on a terminal of the size the user's resize gave.
    #[tokio::test]
    async fn a_terminal_exec_sees_a_terminal_of_the_users_size() {
        let entrance = Entrance::Process {
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: std::env::temp_dir(),
            group: None,
        };
        let exec = ExecStream {
            command: ["sh", "-c", "read go; test -t 0 && test -t 1 && stty size"]
                .map(String::from)
                .to_vec(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: true,
        };
        let (mut child, held) = spawn(&entrance, &exec).await.unwrap();
        let size = TerminalSize {
            width: 100,
            height: 30,
        };
        // The shell reads the size only after a line of input, which comes after the resize.
        rustix::termios::tcsetwinsize(held.terminal.as_ref().unwrap(), window(&size)).unwrap();
        held.input.unwrap().write_all(b"go\n").await.unwrap();
        let mut output = Vec::new();
        let mut stdout = held.stdout.unwrap();
        let _ = stdout.read_to_end(&mut output).await;
        let status = child.wait().await.unwrap();
        assert!(status.success(), "{}", String::from_utf8_lossy(&output));
        // The terminal echoes the input line first.
        assert_eq!(String::from_utf8_lossy(&output), "go\r\n30 100\r\n");
    }

    #[test]
    fn open_streams_are_bounded_and_given_back() {
        let streams = OpenStreams::default();
        let slots: Vec<_> = (0..darkcore_proto::MAX_STREAMS_PER_DEVICE)
            .map(|_| streams.take().expect("below the bound"))
            .collect();
        assert!(streams.take().is_none());
        drop(slots);
        assert!(streams.take().is_some());
    }
}
