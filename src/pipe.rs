//! The byte pump between OpenSSH (our stdin/stdout) and the agent stream.
//!
//! OpenSSH `-W` semantics: stdin EOF half-closes the stream and we keep
//! reading; stream EOF ends the session at once, even if stdin is still open.
//! Each direction runs on its own OS thread with blocking I/O and 256 KiB
//! buffers: it is the fastest portable way to move bytes between arbitrary
//! fds (pipes, sockets, files, terminals), and it keeps the pump independent
//! of anything the async runtime is doing — a hung API call can never stall
//! it.
//!
//! [`protect_stdio`] moves the real stdin/stdout to private descriptors and
//! points fd 1 at stderr, so nothing but stream bytes can ever reach the
//! stdout OpenSSH reads, whatever a library prints.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use tokio::sync::mpsc::UnboundedSender;

/// Read/write size per syscall.
pub const BUF_SIZE: usize = 256 * 1024;

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

/// A kernel socket the pump can drive with blocking I/O from two threads.
pub trait Socket: Read + Write + Send + Sized + 'static {
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
    let up_sock = stream.try_clone()?;
    let down_sock = stream;
    let input = File::from(stdio.input);
    let output = File::from(stdio.output);

    std::thread::Builder::new()
        .name("pump-up".into())
        .spawn(move || pump_up(input, up_sock))?;
    std::thread::Builder::new()
        .name("pump-down".into())
        .spawn(move || {
            let end = pump_down(down_sock, output);
            let _ = done.send(end);
        })?;
    Ok(())
}

/// stdin → stream; on stdin EOF half-close the stream.
fn pump_up<S: Socket>(mut input: File, mut sock: S) {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total: u64 = 0;
    loop {
        match input.read(&mut buf) {
            Ok(0) => {
                log::debug!("stdin EOF after {total} bytes; half-closing the stream");
                let _ = sock.shutdown_write();
                return;
            }
            Ok(n) => {
                if let Err(e) = sock.write_all(&buf[..n]) {
                    log::debug!("writing to the agent stream failed: {e}");
                    return;
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(&input),
            Err(e) => {
                log::debug!("reading stdin failed: {e}; half-closing the stream");
                let _ = sock.shutdown_write();
                return;
            }
        }
    }
}

/// stream → stdout until the stream ends.
fn pump_down<S: Socket>(mut sock: S, mut output: File) -> End {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total: u64 = 0;
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
            Err(e) => return End::RemoteError(e),
        }
    }
}

/// `write_all` that tolerates a non-blocking stdout (a terminal or pipe some
/// parent set O_NONBLOCK on).
fn write_all_fd(out: &mut File, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match out.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_fd(raw(out), libc::POLLOUT),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn raw(f: &File) -> RawFd {
    use std::os::fd::AsRawFd;
    f.as_raw_fd()
}

fn wait_readable(f: &File) {
    wait_fd(raw(f), libc::POLLIN)
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
