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

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
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

/// SSH receive window per channel. russh tops it back up as soon as data is
/// received, so this is also the most client data that can be in flight
/// once the session stops reading (see `endpoint.rs`, which sizes its
/// buffering on it).
pub const WINDOW_SIZE: u32 = 8 * 1024 * 1024;

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

/// How many bytes of client data we hold for a child that is not reading its
/// stdin before we stop draining the channel. russh re-opens the receive
/// window as soon as a packet is *received* (not when it is consumed), so the
/// only backpressure available is to stop reading the channel, which stalls
/// the session loop. Holding a bounded amount first keeps the loop moving long
/// enough to see the client's own WINDOW_ADJUSTs (needed when the child's
/// output is waiting on them, e.g. `cat` echoing a big stream), while still
/// bounding memory for a 1 GiB upload into a slow consumer.
const STDIN_QUEUE_LIMIT: usize = 16 * 1024 * 1024;

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
        };
        let running = russh::server::run_stream(Arc::clone(&self.config), stream, handler)
            .await
            .context("ssh handshake")?;
        let result = running.await.context("ssh session");
        drop(alive);
        result
    }
}

/// Per-connection russh handler. Channel work happens in one task per
/// channel ([`run_channel`]); the handler only answers requests so the
/// session loop never waits on a process.
struct SessionHandler {
    ctx: Arc<Ctx>,
    /// Closed when the connection is over; see [`EmbeddedSsh::serve`].
    alive: watch::Receiver<()>,
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
        tokio::spawn(run_channel(
            channel,
            session.handle(),
            Arc::clone(&self.ctx),
            self.alive.clone(),
        ));
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
            Some(ChannelMsg::Data { data }) => early.push(data),
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
            pump_output(stdout, &tx, None),
            pump_output(stderr, &tx, Some(1))
        );
    };
    let input = pump_input(&mut rx, stdin, early, pty_master.as_deref(), pgid);

    let finished = tokio::select! {
        status = async { outputs.await; child.wait().await } => Some(status),
        () = input => None,
        () = connection_gone(&mut alive) => None,
    };
    let Some(status) = finished else {
        // The client closed the channel or the connection died: nobody is
        // left to read the output, so end the program like sshd does.
        drop(guard);
        let _ = child.wait().await;
        return;
    };
    guard.disarm();

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
/// slows the program instead of growing a buffer.
async fn pump_output(src: Option<BoxRead>, tx: &ChannelWriteHalf<Msg>, ext: Option<u32>) {
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
        let sent = match ext {
            None => tx.data_bytes(chunk).await,
            Some(code) => tx.extended_data_bytes(code, chunk).await,
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
/// so the session loop never blocks on this channel.
async fn pump_input(
    rx: &mut ChannelReadHalf,
    mut stdin: Option<BoxWrite>,
    mut input: Input,
    pty_master: Option<&AsyncFd<OwnedFd>>,
    pgid: Option<i32>,
) {
    let is_pty = pty_master.is_some();
    loop {
        // Client EOF: close stdin once everything before it is written, which
        // is what makes `ssh host 'wc -c' < file` terminate. A pty has no
        // separate stdin to close, so EOF there is ignored (as sshd does).
        if input.eof && input.queue.is_empty() && !is_pty {
            if let Some(mut s) = stdin.take() {
                let _ = s.shutdown().await;
            }
        }
        let can_read = input.queued < STDIN_QUEUE_LIMIT;
        let has_work = stdin.is_some() && !input.queue.is_empty();
        tokio::select! {
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
