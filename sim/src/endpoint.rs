//! Agent endpoints: the TCP port a simulated workspace agent listens on.
//!
//! This module owns the listener, the accept loop and the registry of live
//! connections, which is what lets tests play the failures coder-proxy must
//! survive: the agent refusing service (`set_accepting(false)`), dropping
//! every connection (`kill_connections`), or dropping them with a TCP RST
//! (`reset_connections`). Behind the port sits either the embedded russh
//! server (`ssh.rs`) or a real `sshd -i` per connection (`sshd.rs`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, BufReader, DuplexStream, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::ssh::EmbeddedSsh;
use crate::sshd::{kill_tree, SshdSetup};

/// Which SSH server answers on an agent endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SshBackend {
    /// In-process russh server; accepts any authentication.
    #[default]
    Embedded,
    /// `/usr/sbin/sshd -i` per connection; needs the key from
    /// [`AgentEndpoint::client_key_path`].
    OpenSsh,
}

/// Buffer between the TCP socket and the embedded server, per direction.
const PIPE_BUF: usize = 256 * 1024;

/// A listening agent. Dropping it closes the listener and kills every
/// connection (and the processes they started).
pub struct AgentEndpoint {
    addr: SocketAddr,
    shared: Arc<Shared>,
    backend: Arc<Backend>,
    accept_task: AbortHandle,
}

/// State shared with the accept loop and the connection tasks.
struct Shared {
    accepting: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Conn>>,
}

/// A live connection, as far as kill/reset need to know it.
struct Conn {
    /// The task owning the connection (the TCP pump, or the sshd waiter);
    /// `None` only for the instant between registration and spawn.
    task: Option<AbortHandle>,
    /// A duplicate of the socket, so SO_LINGER/shutdown can be applied no
    /// matter who holds the original (a task, or an sshd process).
    sock: OwnedFd,
    /// For the OpenSsh backend: the `sshd -i` process.
    sshd_pid: Option<u32>,
}

enum Backend {
    Embedded {
        ssh: EmbeddedSsh,
        /// Sessions' working directory; removed with the endpoint.
        work_dir: tempfile::TempDir,
    },
    OpenSsh(SshdSetup),
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Conn>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (single inserts/removes), so poisoning is ignored.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_all(&self) -> Vec<Conn> {
        self.conns().drain().map(|(_, c)| c).collect()
    }
}

impl AgentEndpoint {
    /// Binds 127.0.0.1:0 and starts accepting. Must be called inside a tokio
    /// runtime; connections are served on it.
    pub async fn start(backend: SshBackend) -> anyhow::Result<AgentEndpoint> {
        let backend = Arc::new(match backend {
            SshBackend::Embedded => {
                let work_dir = tempfile::Builder::new()
                    .prefix("coder-sim-agent-")
                    .tempdir()
                    .context("creating agent work dir")?;
                Backend::Embedded {
                    ssh: EmbeddedSsh::new(work_dir.path())?,
                    work_dir,
                }
            }
            SshBackend::OpenSsh => Backend::OpenSsh(SshdSetup::prepare().await?),
        });
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding agent endpoint")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            accepting: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
        });
        let accept_task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            Arc::clone(&backend),
        ))
        .abort_handle();
        Ok(AgentEndpoint {
            addr,
            shared,
            backend,
            accept_task,
        })
    }

    /// The address coder-proxy should dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Which server answers here.
    pub fn backend(&self) -> SshBackend {
        match *self.backend {
            Backend::Embedded { .. } => SshBackend::Embedded,
            Backend::OpenSsh(_) => SshBackend::OpenSsh,
        }
    }

    /// `false`: new TCP connections are accepted and immediately closed (the
    /// agent is down). Existing connections are not affected.
    pub fn set_accepting(&self, yes: bool) {
        self.shared.accepting.store(yes, Ordering::SeqCst);
    }

    /// Aborts every live connection (FIN to the client) and kills the
    /// processes behind them.
    pub fn kill_connections(&self) {
        for conn in self.shared.take_all() {
            end_conn(conn, false);
        }
    }

    /// Aborts every live connection with a TCP RST (SO_LINGER 0, no FIN).
    pub fn reset_connections(&self) {
        for conn in self.shared.take_all() {
            end_conn(conn, true);
        }
    }

    /// Connections currently being served (accepted-and-closed ones while
    /// not accepting are never counted).
    pub fn live_connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// OpenSsh backend: the private key to pass to `ssh -i`. Embedded: `None`
    /// (any authentication is accepted).
    pub fn client_key_path(&self) -> Option<PathBuf> {
        match &*self.backend {
            Backend::Embedded { .. } => None,
            Backend::OpenSsh(setup) => Some(setup.client_key_path().to_path_buf()),
        }
    }

    /// Embedded: the directory sessions start in (relative `scp` paths land
    /// here). OpenSsh: `None` — sshd uses the user's home directory.
    pub fn work_dir(&self) -> Option<PathBuf> {
        match &*self.backend {
            Backend::Embedded { work_dir, .. } => Some(work_dir.path().to_path_buf()),
            Backend::OpenSsh(_) => None,
        }
    }
}

impl Drop for AgentEndpoint {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.kill_connections();
    }
}

impl std::fmt::Debug for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentEndpoint")
            .field("addr", &self.addr)
            .field("backend", &self.backend())
            .field("live_connections", &self.live_connections())
            .finish()
    }
}

fn end_conn(conn: Conn, reset: bool) {
    if reset {
        // With linger 0 the final close sends RST instead of FIN. No
        // shutdown() here: that would send a FIN first, and the client would
        // see a clean EOF instead of ECONNRESET.
        set_linger_zero(&conn.sock);
    }
    match conn.sshd_pid {
        // Kill before touching the socket: an sshd that sees EOF exits at
        // once, its session processes get reparented to init, and the tree
        // walk would no longer find them. The waiter task reaps sshd.
        Some(pid) => kill_tree(pid),
        // Dropping the pump closes the socket; the embedded session sees EOF
        // and kills the processes it started.
        None => {
            if let Some(task) = &conn.task {
                task.abort();
            }
        }
    }
    if !reset {
        // FIN right now, whoever else still holds the socket.
        // SAFETY: shutdown(2) on a descriptor we own.
        unsafe { libc::shutdown(conn.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
    drop(conn.sock);
}

fn set_linger_zero(sock: &OwnedFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a properly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::warn!(
            "endpoint: SO_LINGER failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, backend: Arc<Backend>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !shared.accepting.load(Ordering::SeqCst) {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        if let Err(e) = start_conn(&shared, &backend, stream) {
            log::warn!("endpoint: cannot serve connection: {e:#}");
        }
    }
}

/// Removes a connection from the registry when its task ends (normally or
/// by abort).
struct Unregister {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
    }
}

fn start_conn(
    shared: &Arc<Shared>,
    backend: &Arc<Backend>,
    stream: TcpStream,
) -> anyhow::Result<()> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    // Register before spawning, so a connection that ends instantly cannot
    // unregister before it is registered (leaving a stale entry that holds
    // the socket open). The abort handle is filled in right after spawn.
    let register = |sock: OwnedFd, sshd_pid: Option<u32>| {
        shared.conns().insert(
            id,
            Conn {
                task: None,
                sock,
                sshd_pid,
            },
        );
        Unregister {
            shared: Arc::clone(shared),
            id,
        }
    };
    let task = match &**backend {
        Backend::Embedded { .. } => {
            let sock = stream.as_fd().try_clone_to_owned().context("dup socket")?;
            let unregister = register(sock, None);
            let backend = Arc::clone(backend);
            tokio::spawn(async move {
                let _unregister = unregister;
                let Backend::Embedded { ssh, .. } = &*backend else {
                    return;
                };
                // The russh session runs in its own task, out of our reach;
                // it talks to an in-memory pipe that this task owns together
                // with the socket, so aborting this task really closes the
                // TCP connection (and, with SO_LINGER 0, resets it).
                let (near, far) = tokio::io::duplex(PIPE_BUF);
                let serve = async {
                    if let Err(e) = ssh.serve(far).await {
                        log::debug!("endpoint: ssh session ended: {e:#}");
                    }
                };
                let pump = pump(stream, near);
                tokio::pin!(pump);
                tokio::select! {
                    // Transport gone: dropping `serve` ends the sessions.
                    () = &mut pump => {}
                    // Session over: its end of the pipe is closed, so the
                    // pump flushes what is left and finishes.
                    () = serve => pump.await,
                }
            })
        }
        Backend::OpenSsh(setup) => {
            let std_stream = stream.into_std().context("socket to std")?;
            // sshd expects an ordinary blocking descriptor on stdin/stdout.
            std_stream
                .set_nonblocking(false)
                .context("socket to blocking")?;
            let fd = OwnedFd::from(std_stream);
            let sock = fd.try_clone().context("dup socket")?;
            let mut child = setup.spawn(fd)?;
            let unregister = register(sock, child.id());
            tokio::spawn(async move {
                let _unregister = unregister;
                // Reaps sshd however it ends (client gone, or killed by us).
                if let Err(e) = child.wait().await {
                    log::warn!("endpoint: waiting for sshd: {e}");
                }
            })
        }
    };
    if let Some(conn) = shared.conns().get_mut(&id) {
        conn.task = Some(task.abort_handle());
    }
    Ok(())
}

/// Copies bytes between the client's socket and the embedded server until
/// the connection is over: the server side is done, or the client is gone.
/// Uses the borrowed `split` halves: an owned write half would send FIN when
/// dropped, defeating `reset_connections`.
async fn pump(mut tcp: TcpStream, inner: DuplexStream) {
    let (tcp_r, mut tcp_w) = tcp.split();
    let (inner_r, inner_w) = tokio::io::split(inner);
    let down = async {
        let mut r = BufReader::with_capacity(PIPE_BUF, inner_r);
        if let Err(e) = tokio::io::copy_buf(&mut r, &mut tcp_w).await {
            log::debug!("endpoint: server->client: {e}");
        }
        let _ = tcp_w.shutdown().await;
    };
    tokio::select! {
        () = down => {}
        () = pump_up(tcp_r, inner_w) => {}
    }
}

/// Client bytes we may hold while the server is not reading. russh re-opens
/// the SSH window when data *arrives*, not when it is consumed, so a program
/// that ignores its stdin stalls the whole session loop, and the client's
/// data then piles up in the socket with the client's FIN behind it. The
/// client cannot have more than a window's worth in flight, so holding
/// that much here lets us always read on to the FIN and notice that the
/// client is gone (a stalled session would never see the EOF itself).
const UP_QUEUE_LIMIT: usize = 2 * crate::ssh::WINDOW_SIZE as usize;

/// After the client's EOF, how long the server may go without taking data
/// before we end the connection. An SSH client only closes its socket when
/// it is done, so this is just the time to say goodbye.
const EOF_GRACE: Duration = Duration::from_secs(3);

/// How often to ask the socket whether the client is gone while our queue is
/// full and the server stalled (a backstop for floods of tiny packets, whose
/// framing overhead the window does not count).
const STALL_CHECK: Duration = Duration::from_millis(500);

/// The client-to-server half of [`pump`]. Returns when the connection should
/// end; the server side only ever sees EOF, never a lost byte, otherwise.
async fn pump_up(
    tcp_r: tokio::net::tcp::ReadHalf<'_>,
    mut inner_w: tokio::io::WriteHalf<DuplexStream>,
) {
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    let mut queued = 0usize;
    let mut eof = false;
    let mut buf = BytesMut::new();
    let mut idle_deadline = tokio::time::Instant::now() + EOF_GRACE;
    loop {
        if eof && queue.is_empty() {
            // Client EOF becomes server EOF; a healthy server then finishes
            // and `down` ends the connection.
            let _ = inner_w.shutdown().await;
            tokio::time::sleep(EOF_GRACE).await;
            return;
        }
        let can_read = !eof && queued < UP_QUEUE_LIMIT;
        if buf.capacity() < PIPE_BUF / 4 {
            buf.reserve(PIPE_BUF);
        }
        tokio::select! {
            r = read_some(&tcp_r, &mut buf), if can_read => match r {
                Ok(0) => {
                    eof = true;
                    idle_deadline = tokio::time::Instant::now() + EOF_GRACE;
                }
                Ok(_) => {
                    let chunk = buf.split().freeze();
                    queued += chunk.len();
                    queue.push_back(chunk);
                }
                Err(e) => {
                    log::debug!("endpoint: client->server: {e}");
                    eof = true;
                    idle_deadline = tokio::time::Instant::now() + EOF_GRACE;
                }
            },
            w = write_some(&mut inner_w, queue.front()), if !queue.is_empty() => match w {
                Ok(n) => {
                    queued -= n;
                    if let Some(front) = queue.front_mut() {
                        if n == front.len() {
                            queue.pop_front();
                        } else {
                            let _ = front.split_to(n);
                        }
                    }
                    idle_deadline = tokio::time::Instant::now() + EOF_GRACE;
                }
                // The server hung up; `down` ends the connection.
                Err(_) => return std::future::pending::<()>().await,
            },
            () = tokio::time::sleep_until(idle_deadline), if eof => return,
            () = client_gone(&tcp_r), if !can_read && !eof => return,
        }
    }
}

/// One read into `buf`. Only needs `&` access to the socket, so the
/// stall check can look at it at the same time. Cancel-safe.
async fn read_some(
    tcp_r: &tokio::net::tcp::ReadHalf<'_>,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    loop {
        tcp_r.readable().await?;
        match tcp_r.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// One write of (part of) `front`. Cancel-safe: an unfinished write wrote
/// nothing.
async fn write_some(
    w: &mut tokio::io::WriteHalf<DuplexStream>,
    front: Option<&Bytes>,
) -> std::io::Result<usize> {
    let Some(front) = front else { return Ok(0) };
    match w.write(front).await? {
        0 => Err(std::io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

/// Resolves when the client has closed or reset the connection, asking the
/// socket (EPOLLRDHUP) since we are not reading it.
async fn client_gone(tcp_r: &tokio::net::tcp::ReadHalf<'_>) {
    loop {
        tokio::time::sleep(STALL_CHECK).await;
        match tcp_r.ready(Interest::READABLE).await {
            Ok(r) if r.is_read_closed() => return,
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
