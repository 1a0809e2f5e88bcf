//! Embedded SSH server for simulated agents (the `Embedded` backend).
//!
//! This module owns the russh server that sits behind an agent endpoint:
//! host key, accept-everything authentication, and session channels that run
//! real processes (`exec` → `sh -c`, `shell` → `sh`, `subsystem sftp` →
//! OpenSSH's `sftp-server`). It is deliberately a faithful *byte pipe*: the
//! point of the simulator is to test a ProxyCommand that shovels SSH bytes, so
//! EOF ordering, exit statuses and flow control must behave like a real sshd
//! even for multi-GiB transfers.
//!
//! The endpoint (see `endpoint.rs`) hands each connection's byte stream to
//! [`EmbeddedSsh::serve`]; everything below that is here.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use russh::keys::PrivateKey;
use russh::server::{Auth, Handle, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Pty, Sig};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// SSH receive window per channel: the most client data a channel lets be
/// outstanding (in flight, or received but not yet taken by the program).
/// This is also the most client data that can be in flight once the session
/// stops reading (see `endpoint.rs`, which sizes its buffering on it).
pub const WINDOW_SIZE: u32 = 8 * 1024 * 1024;

/// The smallest window top-up we ask russh for while a channel is backed up:
/// one OpenSSH-sized packet. It must stay above zero (see [`Flow`]).
const MIN_WINDOW: u32 = 32 * 1024;

/// Where Debian/Fedora/Alpine-style installs keep OpenSSH's sftp server.
const SFTP_SERVER_CANDIDATES: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
];

/// Read size for child stdout/stderr. Large reads keep per-packet overhead
/// (and session-loop wakeups) low on bulk downloads.
const READ_CHUNK: usize = 256 * 1024;

/// Client data held for a program that is not reading its stdin, above which
/// we stop draining the channel, provided no output of the session is waiting
/// to be sent (see [`Flow`]).
const STALL_BACKLOG: usize = WINDOW_SIZE as usize;

/// Client data held for a program, above which we stop draining the channel
/// no matter what. With the window shaping in [`Flow`] a compliant client
/// cannot get near it (the backlog stays below about 2 × `WINDOW_SIZE`); it
/// only bounds memory against a client that ignores flow control.
const HARD_BACKLOG: usize = 4 * WINDOW_SIZE as usize;

/// The OpenSSH `sftp-server` binary, if installed.
pub fn sftp_server_path() -> Option<PathBuf> {
    SFTP_SERVER_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// One ed25519 host key per process: generating is cheap, but tests that
/// start many endpoints do not need distinct identities (clients run with
/// `StrictHostKeyChecking=no`).
fn host_key() -> anyhow::Result<PrivateKey> {
    static KEY: OnceLock<PrivateKey> = OnceLock::new();
    if let Some(k) = KEY.get() {
        return Ok(k.clone());
    }
    let mut seed = [0u8; 32];
    rand::RngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut seed)
        .context("no OS randomness for the host key")?;
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(pair);
    Ok(KEY.get_or_init(|| key).clone())
}

/// An embedded SSH server: configuration plus the directory sessions run in.
pub struct EmbeddedSsh {
    config: Arc<russh::server::Config>,
    ctx: Arc<Ctx>,
}

/// What every session needs to start processes.
struct Ctx {
    work_dir: PathBuf,
    sftp_server: Option<PathBuf>,
}

impl EmbeddedSsh {
    /// Builds a server whose sessions start in `work_dir`.
    pub fn new(work_dir: &Path) -> anyhow::Result<EmbeddedSsh> {
        let config = russh::server::Config {
            keys: vec![host_key()?],
            // Everything is accepted, so there is no rejection to make
            // constant-time; a delay would only slow every test down.
            auth_rejection_time: Duration::ZERO,
            auth_rejection_time_initial: Some(Duration::ZERO),
            // Real agents keep idle sessions (e.g. `sleep 3600`) forever; the
            // endpoint's kill/reset controls are how tests end them.
            inactivity_timeout: None,
            keepalive_interval: None,
            // Bulk transfers: Nagle only adds latency to interactive echoes.
            nodelay: true,
            window_size: WINDOW_SIZE,
            channel_buffer_size: 256,
            event_buffer_size: 64,
            ..Default::default()
        };
        Ok(EmbeddedSsh {
            config: Arc::new(config),
            ctx: Arc::new(Ctx {
                work_dir: work_dir.to_path_buf(),
                sftp_server: sftp_server_path(),
            }),
        })
    }

    /// Runs one SSH connection over `stream` until the client disconnects or
    /// the stream fails. Processes started by the session are killed when it
    /// ends, or as soon as this future is dropped: the caller drops it when
    /// the transport is gone, which must end the sessions even if russh's
    /// session loop is stalled (it stalls, by design, while a program is not
    /// reading its stdin, and would then never notice the EOF).
    pub async fn serve<S>(&self, stream: S) -> anyhow::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (alive, alive_rx) = watch::channel(());
        let handler = SessionHandler {
            ctx: Arc::clone(&self.ctx),
            alive: alive_rx,
            flow: SessionFlow::new(),
            channels: HashMap::new(),
        };
        let running = russh::server::run_stream(Arc::clone(&self.config), stream, handler)
            .await
            .context("ssh handshake")?;
        let result = running.await.context("ssh session");
        drop(alive);
        result
    }
}

/// Flow control for the client's data.
///
/// russh (0.65) re-opens a channel's receive window as soon as a packet is
/// *received*, not when the program consumes it, and delivers every packet
/// through a bounded queue whose send the session loop awaits. So the only
/// way to stop a client is to stop draining the channel, which stalls the
/// whole session loop, WINDOW_ADJUSTs from the client included. If a
/// program's output is waiting for such an adjust (`cat` echoing a stream
/// whose reader is slower than its writer) and the program in turn stops
/// reading stdin until its output goes out, nothing moves again: a deadlock.
///
/// So the session keeps draining channels whenever any output is waiting to
/// be sent, and bounds memory with the window instead: russh asks the
/// handler, at each top-up, how large the next top-up may be
/// ([`russh::server::Handler::adjust_window`]), and we answer with the room
/// left below `WINDOW_SIZE` of unconsumed data. A backed-up channel thus gets
/// only `MIN_WINDOW` per top-up (never zero: russh only asks again when data
/// arrives, so a closed window could never re-open). Draining stops only
/// while nothing is waiting to go out, which cannot hold up an adjust we
/// need; it resumes as soon as something is.
struct Flow {
    /// Client data received for the channel that its program has not taken.
    backlog: AtomicUsize,
    /// The session's flow state, shared by its channels.
    session: Arc<SessionFlow>,
}

/// What every channel of a session needs to know about the others.
struct SessionFlow {
    /// How many outputs (of any channel) are waiting to be sent, i.e. may
    /// need the session loop to process a WINDOW_ADJUST.
    sending: watch::Sender<usize>,
}

impl SessionFlow {
    fn new() -> Arc<SessionFlow> {
        Arc::new(SessionFlow {
            sending: watch::channel(0).0,
        })
    }

    /// Marks an output as waiting until the guard is dropped.
    fn sending(&self) -> SendingGuard<'_> {
        self.sending.send_modify(|n| *n += 1);
        SendingGuard(self)
    }
}

struct SendingGuard<'a>(&'a SessionFlow);

impl Drop for SendingGuard<'_> {
    fn drop(&mut self) {
        self.0.sending.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Flow {
    fn set_backlog(&self, bytes: usize) {
        self.backlog.store(bytes, Ordering::Relaxed);
    }

    /// The window top-up this channel can take without its unconsumed data
    /// exceeding `WINDOW_SIZE` (but at least `MIN_WINDOW`).
    fn target_window(&self) -> u32 {
        let room = (WINDOW_SIZE as usize).saturating_sub(self.backlog.load(Ordering::Relaxed));
        room.clamp(MIN_WINDOW as usize, WINDOW_SIZE as usize) as u32
    }
}

/// Per-connection russh handler. Channel work happens in one task per
/// channel ([`run_channel`]); the handler only answers requests so the
/// session loop never waits on a process.
struct SessionHandler {
    ctx: Arc<Ctx>,
    /// Closed when the connection is over; see [`EmbeddedSsh::serve`].
    alive: watch::Receiver<()>,
    /// Shared with every channel task; see [`Flow`].
    flow: Arc<SessionFlow>,
    /// Live channels' flow state (owned by their tasks).
    channels: HashMap<ChannelId, Weak<Flow>>,
}

impl SessionHandler {
    fn subsystem_supported(&self, name: &str) -> bool {
        name == "sftp" && self.ctx.sftp_server.is_some()
    }
}

impl russh::server::Handler for SessionHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        _offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        let flow = Arc::new(Flow {
            backlog: AtomicUsize::new(0),
            session: Arc::clone(&self.flow),
        });
        self.channels.retain(|_, f| f.strong_count() > 0);
        self.channels.insert(channel.id(), Arc::downgrade(&flow));
        tokio::spawn(run_channel(
            channel,
            session.handle(),
            Arc::clone(&self.ctx),
            self.alive.clone(),
            flow,
        ));
        Ok(())
    }

    /// The next window top-up, for whichever channel gets it (russh keeps a
    /// single target per session): the smallest any live channel can take,
    /// so a backed-up channel is never over-granted. See [`Flow`].
    fn adjust_window(&mut self, _channel: ChannelId, _current: u32) -> u32 {
        self.channels
            .values()
            .filter_map(Weak::upgrade)
            .map(|f| f.target_window())
            .min()
            .unwrap_or(WINDOW_SIZE)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Must agree with `run_channel`, which only starts what we accept.
        if self.subsystem_supported(name) {
            session.channel_success(channel)
        } else {
            log::warn!(
                "ssh: refusing subsystem {name:?}{}",
                if name == "sftp" {
                    " (sftp-server not found: install openssh-sftp-server)"
                } else {
                    ""
                }
            );
            session.channel_failure(channel)
        }
    }
}

/// What a session channel was asked to run.
enum Program {
    Exec(Vec<u8>),
    Shell,
    Sftp(PathBuf),
}

/// A pty request's geometry.
#[derive(Clone, Copy)]
struct PtySize {
    cols: u16,
    rows: u16,
}

/// Drives one session channel: collects env/pty requests, starts the program,
/// then pipes data both ways until the program is done or the channel goes
/// away.
async fn run_channel(
    channel: Channel<Msg>,
    handle: Handle,
    ctx: Arc<Ctx>,
    mut alive: watch::Receiver<()>,
    flow: Arc<Flow>,
) {
    let id = channel.id();
    let (mut rx, tx) = channel.split();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut pty: Option<PtySize> = None;
    let mut early = Input::default();

    // Setup phase: requests arrive in order before (or interleaved with)
    // the first data, so anything seen here is replayed to the program.
    let program = loop {
        let msg = tokio::select! {
            msg = rx.wait() => msg,
            () = connection_gone(&mut alive) => return,
        };
        match msg {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => env.push((variable_name, variable_value)),
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                env.push(("TERM".into(), term));
                pty = Some(PtySize {
                    cols: clamp_u16(col_width),
                    rows: clamp_u16(row_height),
                });
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some(p) = pty.as_mut() {
                    p.cols = clamp_u16(col_width);
                    p.rows = clamp_u16(row_height);
                }
            }
            Some(ChannelMsg::Exec { command, .. }) => break Program::Exec(command),
            Some(ChannelMsg::RequestShell { .. }) => break Program::Shell,
            Some(ChannelMsg::RequestSubsystem { name, .. }) => {
                // The handler already answered; only start what it accepted.
                if name == "sftp" {
                    if let Some(path) = ctx.sftp_server.clone() {
                        break Program::Sftp(path);
                    }
                }
            }
            Some(ChannelMsg::Data { data }) => {
                early.push(data);
                flow.set_backlog(early.queued);
            }
            Some(ChannelMsg::Eof) => early.eof = true,
            Some(_) => {}
        }
    };

    let (mut child, io) = match spawn_program(&program, &env, pty, &ctx.work_dir) {
        Ok(x) => x,
        Err(e) => {
            // Same shape as a shell that cannot find the command.
            log::warn!("ssh: cannot start program: {e:#}");
            let msg = format!("coder-sim: cannot start program: {e:#}\n");
            let _ = tx.extended_data_bytes(1, Bytes::from(msg)).await;
            let _ = tx.eof().await;
            let _ = tx.exit_status(127).await;
            let _ = tx.close().await;
            return;
        }
    };
    let guard = GroupKiller::new(child.id());
    let pgid = guard.0;
    let ChildIo {
        stdin,
        stdout,
        stderr,
        pty_master,
    } = io;

    let outputs = async {
        tokio::join!(
            pump_output(stdout, &tx, None, &flow.session),
            pump_output(stderr, &tx, Some(1), &flow.session)
        );
    };
    let input = pump_input(&mut rx, stdin, early, pty_master.as_deref(), pgid, &flow);

    let finished = tokio::select! {
        status = async { outputs.await; child.wait().await } => Some(status),
        () = input => None,
        () = connection_gone(&mut alive) => None,
    };
    // Nothing reads the channel from here on: let russh discard what the
    // client still sends instead of stalling the session on it.
    drop(rx);
    flow.set_backlog(0);
    let Some(status) = finished else {
        // The client closed the channel or the connection died: nobody is
        // left to read the output, so end the program like sshd does.
        drop(guard);
        let _ = child.wait().await;
        return;
    };
    guard.disarm();

    // These wait for the session loop too; keep the other channels draining.
    let _sending = flow.session.sending();
    let _ = tx.eof().await;
    match status {
        Ok(status) => send_exit(&tx, &handle, id, status).await,
        Err(e) => {
            log::warn!("ssh: waiting for child: {e}");
            let _ = tx.exit_status(255).await;
        }
    }
    let _ = tx.close().await;
}

/// Resolves once the connection's `alive` sender is dropped.
async fn connection_gone(alive: &mut watch::Receiver<()>) {
    while alive.changed().await.is_ok() {}
}

fn clamp_u16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// Reports how the program ended: `exit-status`, or `exit-signal` when it
/// was killed (so `ssh` exits 255 and prints the signal, like with sshd).
async fn send_exit(tx: &ChannelWriteHalf<Msg>, handle: &Handle, id: ChannelId, status: ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        let _ = tx.exit_status(code as u32).await;
    } else if let Some(sig) = status.signal() {
        let _ = handle
            .exit_signal_request(
                id,
                sig_from_libc(sig),
                status.core_dumped(),
                String::new(),
                String::new(),
            )
            .await;
    } else {
        let _ = tx.exit_status(255).await;
    }
}

fn sig_from_libc(sig: i32) -> Sig {
    match sig {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        libc::SIGUSR2 => Sig::Custom("USR2".into()),
        other => Sig::Custom(format!("SIG{other}")),
    }
}

fn sig_to_libc(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(name) if name == "USR2" => libc::SIGUSR2,
        Sig::Custom(_) => return None,
    })
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// The program's end of the channel: pipes, or a pty master for both ways.
struct ChildIo {
    stdin: Option<BoxWrite>,
    stdout: Option<BoxRead>,
    stderr: Option<BoxRead>,
    pty_master: Option<Arc<AsyncFd<OwnedFd>>>,
}

fn spawn_program(
    program: &Program,
    env: &[(String, String)],
    pty: Option<PtySize>,
    work_dir: &Path,
) -> anyhow::Result<(Child, ChildIo)> {
    let mut cmd = match program {
        Program::Exec(command) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(OsStr::from_bytes(command));
            c
        }
        Program::Shell => Command::new("sh"),
        Program::Sftp(path) => Command::new(path),
    };
    cmd.current_dir(work_dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        // Backstop for task cancellation (runtime shutdown): the group kill
        // below handles grandchildren, this handles the direct child.
        .kill_on_drop(true);

    // A pty only makes sense for interactive programs; sftp is binary.
    let pty = match program {
        Program::Sftp(_) => None,
        _ => pty,
    };
    match pty {
        None => {
            // Own process group so teardown can kill `sh -c 'a | b'` whole.
            cmd.process_group(0)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().context("spawn")?;
            let io = ChildIo {
                stdin: child.stdin.take().map(|s| Box::new(s) as BoxWrite),
                stdout: child.stdout.take().map(|s| Box::new(s) as BoxRead),
                stderr: child.stderr.take().map(|s| Box::new(s) as BoxRead),
                pty_master: None,
            };
            Ok((child, io))
        }
        Some(size) => {
            let (master, slave) = open_pty(size).context("openpty")?;
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            // SAFETY: only async-signal-safe calls between fork and exec.
            // setsid makes the child a session (and group) leader so it can
            // take the pty as its controlling terminal; the group id is then
            // its pid, which is what teardown kills.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().context("spawn")?;
            // The slave copies held by `cmd` must close, or the master never
            // sees EOF (EIO) when the program exits.
            drop(cmd);
            // SAFETY: an OwnedFd stays open and unchanged while owned.
            let master = unsafe { AsyncFd::register(master) }.map_err(|e| e.into_parts().1)?;
            let master = Arc::new(master);
            let io = ChildIo {
                stdin: Some(Box::new(PtyIo(Arc::clone(&master)))),
                stdout: Some(Box::new(PtyIo(Arc::clone(&master)))),
                stderr: None,
                pty_master: Some(master),
            };
            Ok((child, io))
        }
    }
}

fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out-pointers are valid; name/termios may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two fresh descriptors we now own.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: plain fcntl on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: as above; the master is driven by tokio, so non-blocking.
    let flags = unsafe { libc::fcntl(master.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok((master, slave))
}

fn set_pty_size(master: &AsyncFd<OwnedFd>, cols: u32, rows: u32) {
    let ws = libc::winsize {
        ws_row: clamp_u16(rows),
        ws_col: clamp_u16(cols),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Async read/write on a non-blocking pty master.
struct PtyIo(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for PtyIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                // SAFETY: reading into an initialized buffer of that length.
                let n = unsafe {
                    libc::read(
                        fd.get_ref().as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Linux reports EIO on the master once every slave fd is
                // closed: that is the pty's end of file.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let res = guard.try_io(|fd| {
                // SAFETY: writing from a valid slice.
                let n = unsafe {
                    libc::write(fd.get_ref().as_raw_fd(), data.as_ptr().cast(), data.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Copies one of the program's outputs to the channel (`ext` = `Some(1)`
/// for stderr). `data_bytes` waits for the client's window, so a slow client
/// slows the program instead of growing a buffer. While it waits, the session
/// keeps draining client data so it can see the window open (see [`Flow`]).
async fn pump_output(
    src: Option<BoxRead>,
    tx: &ChannelWriteHalf<Msg>,
    ext: Option<u32>,
    flow: &SessionFlow,
) {
    let Some(mut src) = src else { return };
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if buf.capacity() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match src.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                log::debug!("ssh: reading program output: {e}");
                return;
            }
        }
        let chunk = buf.split().freeze();
        let sent = {
            let _sending = flow.sending();
            match ext {
                None => tx.data_bytes(chunk).await,
                Some(code) => tx.extended_data_bytes(code, chunk).await,
            }
        };
        if sent.is_err() {
            // The session is gone; keep nothing around.
            return;
        }
    }
}

/// Client data waiting for the program's stdin.
#[derive(Default)]
struct Input {
    queue: VecDeque<Bytes>,
    queued: usize,
    eof: bool,
}

impl Input {
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }
}

/// Feeds client data to the program's stdin and handles in-session requests
/// (window-change, signal). Returns only when the client closes the channel
/// or the session ends; after the program's stdin is gone it keeps draining
/// so the session loop never blocks on this channel. While the program is
/// not keeping up it stops draining only as [`Flow`] allows.
async fn pump_input(
    rx: &mut ChannelReadHalf,
    mut stdin: Option<BoxWrite>,
    mut input: Input,
    pty_master: Option<&AsyncFd<OwnedFd>>,
    pgid: Option<i32>,
    flow: &Flow,
) {
    let is_pty = pty_master.is_some();
    let mut sending = flow.session.sending.subscribe();
    loop {
        flow.set_backlog(input.queued);
        // Client EOF: close stdin once everything before it is written, which
        // is what makes `ssh host 'wc -c' < file` terminate. A pty has no
        // separate stdin to close, so EOF there is ignored (as sshd does).
        if input.eof && input.queue.is_empty() && !is_pty {
            if let Some(mut s) = stdin.take() {
                let _ = s.shutdown().await;
            }
        }
        // Stalling the session loop is only safe while no output waits for
        // a WINDOW_ADJUST that the loop would then never read.
        let output_waiting = *sending.borrow_and_update() > 0;
        let can_read =
            input.queued < HARD_BACKLOG && (input.queued < STALL_BACKLOG || output_waiting);
        let has_work = stdin.is_some() && !input.queue.is_empty();
        tokio::select! {
            // An output started waiting: drain again. (Cannot fail: `flow`
            // holds the sender.)
            _ = sending.changed(), if !can_read => {}
            msg = rx.wait(), if can_read => match msg {
                None | Some(ChannelMsg::Close) => return,
                Some(ChannelMsg::Data { data }) => {
                    if stdin.is_some() {
                        input.push(data);
                    }
                }
                Some(ChannelMsg::Eof) => input.eof = true,
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    if let Some(m) = pty_master {
                        set_pty_size(m, col_width, row_height);
                    }
                }
                Some(ChannelMsg::Signal { signal }) => {
                    // Delivered to the whole group, like a terminal would.
                    if let (Some(pgid), Some(sig)) = (pgid, sig_to_libc(&signal)) {
                        // SAFETY: kill(2) on the live group we created.
                        unsafe { libc::kill(-pgid, sig) };
                    }
                }
                Some(_) => {}
            },
            written = write_front(stdin.as_mut(), &mut input), if has_work => {
                if let Err(e) = written {
                    // The program closed stdin (EPIPE) or exited: discard
                    // what is queued and whatever else arrives.
                    log::debug!("ssh: writing program stdin: {e}");
                    stdin = None;
                    input.queue.clear();
                    input.queued = 0;
                }
            }
        }
    }
}

/// Writes (part of) the first queued chunk. Cancel-safe: a write that did
/// not complete wrote nothing.
async fn write_front(stdin: Option<&mut BoxWrite>, input: &mut Input) -> io::Result<()> {
    let (Some(stdin), Some(front)) = (stdin, input.queue.front_mut()) else {
        return Ok(());
    };
    let n = stdin.write(front).await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    input.queued -= n;
    if n == front.len() {
        input.queue.pop_front();
    } else {
        let _ = front.split_to(n);
    }
    Ok(())
}

/// Kills a program's whole process group unless disarmed (the program was
/// reaped normally, so its pid may be reused and must not be signalled).
struct GroupKiller(Option<i32>);

impl GroupKiller {
    fn new(pid: Option<u32>) -> GroupKiller {
        GroupKiller(pid.and_then(|p| i32::try_from(p).ok()))
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: plain kill(2) on a group we created and have not reaped.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}
