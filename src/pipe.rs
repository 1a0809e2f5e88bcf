//! The byte pump between OpenSSH (our stdin/stdout) and the agent stream.
//!
//! OpenSSH `-W` semantics: stdin EOF half-closes the stream and we keep
//! reading; stream EOF ends the session at once, even if stdin is still open.
//! Each direction runs on its own OS thread, which keeps the pump independent
//! of anything the async runtime is doing — a hung API call can never stall
//! it.
//!
//! OpenSSH hands a ProxyCommand two pipes. On Linux, when stdin and stdout
//! are both pipes, each direction moves bytes with `splice(2)` straight
//! between the pipe and the socket: no copy through user space, and a third
//! of the CPU per GiB of the copy loop (docs/PERFORMANCE.md). The socket is
//! then non-blocking and every splice is `SPLICE_F_NONBLOCK`, waiting in
//! poll(2) instead: a splice that sleeps holds the pipe's lock, and OpenSSH,
//! single-threaded, would block on that lock in its next read or write of
//! the same pipe and stop serving the other direction — a deadlock under
//! bidirectional traffic. Anything else (files, terminals, sockets as
//! stdio, a kernel that refuses the splice) uses the portable copy loop with
//! 256 KiB buffers, which tolerates non-blocking descriptors on either side.
//! Both stdio pipes are also grown to [`PIPE_SIZE`] (best effort), so each
//! wake-up moves more than the default 64 KiB.
//!
//! [`protect_stdio`] moves the real stdin/stdout to private descriptors and
//! points fd 1 at stderr, so nothing but stream bytes can ever reach the
//! stdout OpenSSH reads, whatever a library prints.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use tokio::sync::mpsc::UnboundedSender;

/// Read/write size per syscall of the copy loop.
pub const BUF_SIZE: usize = 256 * 1024;

/// Capacity we ask for on the stdin and stdout pipes (default 64 KiB). Pipe
/// capacity counts against the user's `fs/pipe-user-pages-soft` quota
/// (64 MiB), so this stays modest: fifty sessions take 25 MiB of it. A
/// refusal is ignored.
pub const PIPE_SIZE: i32 = 256 * 1024;

/// Most bytes one splice(2) call moves (it moves at most a pipe's worth).
const SPLICE_LEN: usize = 1 << 20;

/// How the pump ended.
#[derive(Debug)]
pub enum End {
    /// The agent side closed the stream cleanly.
    RemoteClosed,
    /// Reading from the agent failed (reset, timeout).
    RemoteError(io::Error),
    /// OpenSSH stopped reading our stdout.
    StdoutClosed,
}

/// The original stdin and stdout, owned privately.
pub struct Stdio {
    pub input: OwnedFd,
    pub output: OwnedFd,
}

/// Take the process's stdin/stdout for the stream; fd 0 becomes /dev/null
/// and fd 1 a copy of stderr.
pub fn protect_stdio() -> io::Result<Stdio> {
    // SAFETY: dup/dup2/open on the process's standard descriptors; results
    // are checked and each new fd is owned exactly once.
    unsafe {
        let input = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        if input < 0 {
            return Err(io::Error::last_os_error());
        }
        let input = OwnedFd::from_raw_fd(input);
        let output = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if output < 0 {
            return Err(io::Error::last_os_error());
        }
        let output = OwnedFd::from_raw_fd(output);
        if libc::dup2(2, 1) < 0 {
            return Err(io::Error::last_os_error());
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        Ok(Stdio { input, output })
    }
}

/// A kernel socket the pump can drive from two threads.
pub trait Socket: Read + Write + AsRawFd + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn shutdown_write(&self) -> io::Result<()>;
    fn set_blocking(&self) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn set_blocking(&self) -> io::Result<()> {
        self.set_nonblocking(false)
    }
}

impl Socket for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn set_blocking(&self) -> io::Result<()> {
        self.set_nonblocking(false)
    }
}

/// Start both directions; the first end is reported on `done`.
pub fn start<S: Socket>(stdio: Stdio, stream: S, done: UnboundedSender<End>) -> io::Result<()> {
    stream.set_blocking()?;
    let input = File::from(stdio.input);
    let output = File::from(stdio.output);
    grow_pipe(&input);
    grow_pipe(&output);
    let splice = splice_supported() && is_pipe(&input) && is_pipe(&output);
    if splice {
        set_nonblocking(stream.as_raw_fd())?;
    }
    log::debug!(
        "pump: {}",
        if splice {
            "splice(2) between the stdio pipes and the stream"
        } else {
            "copy loop"
        }
    );
    let up_sock = stream.try_clone()?;
    let down_sock = stream;

    std::thread::Builder::new()
        .name("pump-up".into())
        .spawn(move || pump_up(input, up_sock, splice))?;
    std::thread::Builder::new()
        .name("pump-down".into())
        .spawn(move || {
            let end = pump_down(down_sock, output, splice);
            let _ = done.send(end);
        })?;
    Ok(())
}

/// stdin → stream; on stdin EOF half-close the stream.
fn pump_up<S: Socket>(mut input: File, mut sock: S, splice: bool) {
    let mut total: u64 = 0;
    if splice {
        let (moved, end) = splice_all(raw(&input), sock.as_raw_fd(), Dir::Up);
        total = moved;
        match end {
            Spliced::Eof => {
                log::debug!("stdin EOF after {total} bytes; half-closing the stream");
                let _ = sock.shutdown_write();
                return;
            }
            Spliced::WriteFailed(e) => {
                log::debug!("writing to the agent stream failed: {e}");
                return;
            }
            Spliced::ReadFailed(e) => {
                log::debug!("reading stdin failed: {e}; half-closing the stream");
                let _ = sock.shutdown_write();
                return;
            }
            Spliced::Unsupported(e) => {
                log::debug!("splice stdin → stream refused ({e}); copying instead");
            }
        }
    }
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        match input.read(&mut buf) {
            Ok(0) => {
                log::debug!("stdin EOF after {total} bytes; half-closing the stream");
                let _ = sock.shutdown_write();
                return;
            }
            Ok(n) => {
                if let Err(e) = write_all_fd(&mut sock, &buf[..n]) {
                    log::debug!("writing to the agent stream failed: {e}");
                    return;
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_fd(raw(&input), libc::POLLIN),
            Err(e) => {
                log::debug!("reading stdin failed: {e}; half-closing the stream");
                let _ = sock.shutdown_write();
                return;
            }
        }
    }
}

/// stream → stdout until the stream ends.
fn pump_down<S: Socket>(mut sock: S, mut output: File, splice: bool) -> End {
    let mut total: u64 = 0;
    if splice {
        let (moved, end) = splice_all(sock.as_raw_fd(), raw(&output), Dir::Down);
        total = moved;
        match end {
            Spliced::Eof => {
                log::debug!("agent stream EOF after {total} bytes");
                return End::RemoteClosed;
            }
            Spliced::WriteFailed(e) => {
                log::debug!("writing stdout failed: {e}");
                return stdout_gone(sock.as_raw_fd());
            }
            Spliced::ReadFailed(e) => return End::RemoteError(e),
            Spliced::Unsupported(e) => {
                log::debug!("splice stream → stdout refused ({e}); copying instead");
            }
        }
    }
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => {
                log::debug!("agent stream EOF after {total} bytes");
                let _ = output.flush();
                return End::RemoteClosed;
            }
            Ok(n) => {
                if let Err(e) = write_all_fd(&mut output, &buf[..n]) {
                    log::debug!("writing stdout failed: {e}");
                    return End::StdoutClosed;
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_fd(sock.as_raw_fd(), libc::POLLIN)
            }
            Err(e) => return End::RemoteError(e),
        }
    }
}

/// OpenSSH closed our stdout. The copy loop only finds that out when it
/// has stream bytes to deliver, so a reset or a FIN that comes first is
/// what it reports; splice checks the pipe first. Report what the copy loop
/// would: wait for the stream to have something, then look at it.
fn stdout_gone(sock: RawFd) -> End {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: recv(2) into a one-byte buffer we own; MSG_PEEK leaves
        // the byte where it is.
        let n = unsafe {
            libc::recv(
                sock,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => return End::RemoteClosed,
            n if n > 0 => return End::StdoutClosed,
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => wait_fd(sock, libc::POLLIN),
                    _ => return End::RemoteError(e),
                }
            }
        }
    }
}

/// Which way a splice runs: stdin pipe → stream, or stream → stdout pipe.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// How a splice loop ended.
enum Spliced {
    /// The source ended (stdin EOF, or the stream's FIN).
    Eof,
    /// The source failed (for `Down`: the stream was reset or timed out).
    ReadFailed(io::Error),
    /// The destination failed (for `Down`: OpenSSH closed our stdout).
    WriteFailed(io::Error),
    /// The kernel will not splice these descriptors; nothing was moved.
    Unsupported(io::Error),
}

/// Splice `from` → `to` until the source ends or a side fails; returns the
/// bytes moved. Both descriptors may be non-blocking: an EAGAIN waits in
/// poll(2) until the destination has room and the source has data.
#[cfg(target_os = "linux")]
fn splice_all(from: RawFd, to: RawFd, dir: Dir) -> (u64, Spliced) {
    let mut total: u64 = 0;
    loop {
        // SAFETY: splice(2) on two descriptors we own, no offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                SPLICE_LEN,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n > 0 {
            total += n as u64;
            continue;
        }
        if n == 0 {
            return (total, Spliced::Eof);
        }
        let e = io::Error::last_os_error();
        let errno = e.raw_os_error().unwrap_or(0);
        let end = match errno {
            libc::EINTR => continue,
            libc::EAGAIN => {
                // Room first (returns at once when there is), then data.
                wait_fd(to, libc::POLLOUT);
                wait_fd(from, libc::POLLIN);
                continue;
            }
            libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP if total == 0 => Spliced::Unsupported(e),
            // Only writing to a pipe or a socket fails with these.
            libc::EPIPE => Spliced::WriteFailed(e),
            libc::ECONNRESET | libc::ENOTCONN if dir == Dir::Up => Spliced::WriteFailed(e),
            _ => Spliced::ReadFailed(e),
        };
        return (total, end);
    }
}

#[cfg(not(target_os = "linux"))]
fn splice_all(_from: RawFd, _to: RawFd, _dir: Dir) -> (u64, Spliced) {
    (0, Spliced::Unsupported(io::ErrorKind::Unsupported.into()))
}

fn splice_supported() -> bool {
    cfg!(target_os = "linux")
}

fn is_pipe(f: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    f.metadata().is_ok_and(|m| m.file_type().is_fifo())
}

/// Ask for a [`PIPE_SIZE`] pipe; harmless when refused or not a pipe.
fn grow_pipe(f: &File) {
    #[cfg(target_os = "linux")]
    if is_pipe(f) {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(raw(f), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `write_all` that tolerates a non-blocking descriptor (a stdout some parent
/// set O_NONBLOCK on, or the stream when splice fell back to copying).
fn write_all_fd<W: Write + AsRawFd>(out: &mut W, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match out.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_fd(out.as_raw_fd(), libc::POLLOUT)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn raw(f: &File) -> RawFd {
    f.as_raw_fd()
}

fn wait_fd(fd: RawFd, events: libc::c_short) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut p, 1, 1000);
    }
}
