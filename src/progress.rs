//! Human progress lines on stderr while coder-proxy waits.
//!
//! IDEs show this stream to users and treat silence as a hang, so every wait
//! announces its stage and repeats a "still waiting" line at least every
//! [`STILL_WAITING_EVERY`]. Lines are also logged so a `--log-dir` file
//! tells the same story.

use std::io::Write;
use std::time::{Duration, Instant};

/// Longest silence while waiting.
pub const STILL_WAITING_EVERY: Duration = Duration::from_secs(10);

/// Writes progress to stderr.
#[derive(Debug)]
pub struct Progress {
    stage: Option<(String, Instant)>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Progress { stage: None }
    }

    /// One line to stderr (and the log).
    pub fn line(&self, msg: &str) {
        log::info!("{msg}");
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{}", crate::logging::redact(msg));
    }

    /// Enter a stage; ends the previous one with its duration.
    pub fn stage(&mut self, title: &str) {
        if self.stage.as_ref().is_some_and(|(t, _)| t == title) {
            return;
        }
        self.finish_stage(true);
        self.line(&format!("==> ⧗ {title}"));
        self.stage = Some((title.to_string(), Instant::now()));
    }

    /// End the current stage, if any.
    pub fn finish_stage(&mut self, ok: bool) {
        if let Some((t, started)) = self.stage.take() {
            let mark = if ok { '✔' } else { '✘' };
            self.line(&format!(
                "=== {mark} {t} [{}ms]",
                started.elapsed().as_millis()
            ));
        }
    }

    /// Whether a stage is open.
    pub fn in_stage(&self) -> bool {
        self.stage.is_some()
    }
}
