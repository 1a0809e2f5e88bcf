//! Logging: env_logger to stderr (warn by default, debug with `-v`,
//! `RUST_LOG` honoured) and, with `--log-dir`, one 0600 file per run.
//!
//! Every formatted line passes through a redactor that replaces the session
//! token, so even a future careless `log::debug!("{headers:?}")` cannot leak
//! it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use log::{LevelFilter, Log, Metadata, Record};

/// The process-wide redactor, for text that bypasses the logger.
static GLOBAL: std::sync::OnceLock<Redactor> = std::sync::OnceLock::new();

/// Make `r` the redactor [`redact`] uses.
pub fn set_global(r: &Redactor) {
    let _ = GLOBAL.set(r.clone());
}

/// Replace registered secrets in `s` (a no-op before [`set_global`]).
pub fn redact(s: &str) -> String {
    match GLOBAL.get() {
        Some(r) => r.apply(s),
        None => s.to_string(),
    }
}

/// Replaces secrets in log text.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Arc<Mutex<Vec<String>>>,
}

impl Redactor {
    /// Register a secret (values shorter than 4 bytes are not worth hiding
    /// and would mangle every line).
    pub fn add(&self, secret: &str) {
        if secret.len() >= 4 {
            self.secrets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(secret.to_string());
        }
    }
    /// `s` with every registered secret replaced.
    pub fn apply(&self, s: &str) -> String {
        let secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = s.to_string();
        for sec in secrets.iter() {
            if out.contains(sec.as_str()) {
                out = out.replace(sec.as_str(), "[REDACTED]");
            }
        }
        out
    }
}

struct Tee {
    stderr: env_logger::Logger,
    file: Option<(env_logger::Logger, Arc<Mutex<File>>)>,
}

impl Log for Tee {
    fn enabled(&self, m: &Metadata) -> bool {
        self.stderr.enabled(m) || self.file.as_ref().is_some_and(|(l, _)| l.enabled(m))
    }
    fn log(&self, r: &Record) {
        if self.stderr.matches(r) {
            self.stderr.log(r);
        }
        if let Some((l, _)) = &self.file {
            if l.matches(r) {
                l.log(r);
            }
        }
    }
    fn flush(&self) {
        self.stderr.flush();
        if let Some((_, f)) = &self.file {
            let _ = f.lock().unwrap_or_else(|e| e.into_inner()).flush();
        }
    }
}

/// A `Write` that forwards to a shared file.
struct SharedFile(Arc<Mutex<File>>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

fn builder(default: LevelFilter, redactor: Redactor, timestamps: bool) -> env_logger::Builder {
    let mut b = env_logger::Builder::new();
    b.filter_level(default);
    // Our own crate at the chosen level; noisy dependencies one notch down.
    if default >= LevelFilter::Debug {
        for noisy in ["hyper", "hyper_util", "reqwest", "rustls", "h2"] {
            b.filter_module(noisy, LevelFilter::Info);
        }
    }
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.format(move |buf, record| {
        let msg = redactor.apply(&record.args().to_string());
        if timestamps {
            writeln!(
                buf,
                "{} {:5} {}: {}",
                buf.timestamp_millis(),
                record.level(),
                record.target(),
                msg
            )
        } else {
            writeln!(
                buf,
                "coder-proxy: {}: {}",
                record.level().as_str().to_lowercase(),
                msg
            )
        }
    });
    b
}

/// Install the logger; returns the log file path when one was created.
pub fn init(verbose: bool, log_dir: Option<&Path>, redactor: Redactor) -> Result<Option<PathBuf>> {
    let stderr_level = if verbose {
        LevelFilter::Debug
    } else {
        LevelFilter::Warn
    };
    let mut stderr = builder(stderr_level, redactor.clone(), verbose);
    stderr.target(env_logger::Target::Stderr);
    let stderr = stderr.build();

    let mut path = None;
    let file = match log_dir {
        Some(dir) => {
            let (f, p) = create_log_file(dir)?;
            path = Some(p);
            let shared = Arc::new(Mutex::new(f));
            let level = if verbose {
                LevelFilter::Debug
            } else {
                LevelFilter::Info
            };
            let mut b = builder(level, redactor, true);
            b.target(env_logger::Target::Pipe(Box::new(SharedFile(
                shared.clone(),
            ))));
            Some((b.build(), shared))
        }
        None => None,
    };
    let max = stderr.filter().max(
        file.as_ref()
            .map(|(l, _)| l.filter())
            .unwrap_or(LevelFilter::Off),
    );
    log::set_boxed_logger(Box::new(Tee { stderr, file }))
        .map_err(|e| anyhow!("cannot install the logger: {e}"))?;
    log::set_max_level(max);
    Ok(path)
}

/// `coder-proxy-YYYYMMDD-HHMMSS-xxxxx-PPID.log`, created exclusively, 0600.
fn create_log_file(dir: &Path) -> Result<(File, PathBuf)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow!("error opening {} for logging: {e}", dir.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stamp = utc_stamp(now);
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() };
    let mut last_err = None;
    for attempt in 0..8u64 {
        let tag = random_tag(attempt);
        let path = dir.join(format!("coder-proxy-{stamp}-{tag}-{ppid}.log"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(anyhow!("error opening {} for logging: {e}", dir.display())),
        }
    }
    Err(anyhow!(
        "error opening {} for logging: {}",
        dir.display(),
        last_err.map(|e| e.to_string()).unwrap_or_default()
    ))
}

fn random_tag(salt: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u32(std::process::id());
    let mut v = h.finish();
    (0..5)
        .map(|_| {
            let c = (b'a' + (v % 26) as u8) as char;
            v /= 26;
            c
        })
        .collect()
}

/// `YYYYMMDD-HHMMSS` in UTC from Unix seconds.
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_798_000_000), "20261223-042640");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
    }

    #[test]
    fn redacts() {
        let r = Redactor::default();
        r.add("s3cr3t-token");
        r.add("ab");
        assert_eq!(
            r.apply("header s3cr3t-token x ab"),
            "header [REDACTED] x ab"
        );
    }

    #[test]
    fn log_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cp-log-test-{}", std::process::id()));
        let (_f, p) = create_log_file(&dir).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.starts_with("coder-proxy-") && name.ends_with(".log"),
            "{name}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
