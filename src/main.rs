//! The `coder-proxy` binary: parse flags, start logging, run, exit.

use std::io::Write;
use std::os::fd::AsRawFd;

use clap::Parser;
use coder_proxy::{cli::Cli, logging, pipe, report, EXIT_SETUP, EXIT_USAGE};

fn main() {
    // Before anything can print: the real stdout is reserved for stream bytes.
    let stdio = match pipe::protect_stdio() {
        Ok(s) => s,
        Err(e) => {
            report(&format!("cannot set up stdin/stdout: {e}"));
            std::process::exit(EXIT_SETUP);
        }
    };
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let text = e.render().to_string();
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                // Help and version are asked for by a person, not by OpenSSH.
                write_fd(stdio.output.as_raw_fd(), text.as_bytes());
                std::process::exit(0);
            }
            let _ = std::io::stderr().write_all(text.as_bytes());
            std::process::exit(EXIT_USAGE);
        }
    };
    let redactor = logging::Redactor::default();
    logging::set_global(&redactor);
    if let Ok(t) = std::env::var("CODER_SESSION_TOKEN") {
        redactor.add(t.trim());
    }
    match logging::init(cli.verbose, cli.log_dir.as_deref(), redactor.clone()) {
        Ok(Some(p)) => log::info!(
            "coder-proxy {} logging to {}",
            env!("CARGO_PKG_VERSION"),
            p.display()
        ),
        Ok(None) => {}
        Err(e) => {
            report(&format!("{e:#}"));
            std::process::exit(EXIT_SETUP);
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&format!("cannot start the async runtime: {e}"));
            std::process::exit(EXIT_SETUP);
        }
    };
    let code = rt.block_on(coder_proxy::run(cli, stdio, redactor));
    log::logger().flush();
    // Exit now: a pump thread may still be blocked reading stdin.
    std::process::exit(code);
}

fn write_fd(fd: i32, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: writing a valid buffer to an fd we own.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n <= 0 {
            return;
        }
        data = &data[n as usize..];
    }
}
