//! Time that counts as silence.
//!
//! A process that was not running — stopped by SIGSTOP (what a closed
//! laptop lid does to a terminal's jobs), or starved for seconds — hears
//! nothing from its peers meanwhile, and that silence is not the peers'
//! fault. Every liveness bound in this crate (the DERP read-idle probe, the
//! DERP write bound, WireGuard's dead-path rule) measures only time we were
//! awake: each looks at the clock often (at least every second while
//! waiting), and a gap between two looks longer than [`PAUSE_GAP`] is taken
//! as a pause and not counted.
//!
//! (A suspended machine stops the monotonic clock on Linux and macOS, so a
//! real laptop sleep is invisible here; what it leaves behind — a relay
//! connection dead without a FIN — is found by the DERP probe.)

use std::time::Duration;

use tokio::time::Instant;

/// A gap between two looks at the clock longer than this is a pause.
/// Waits look every second or faster, so an awake process never gets near
/// it; a loaded one merely gets a little longer before a bound fires.
pub const PAUSE_GAP: Duration = Duration::from_secs(3);

/// Notices that the process was not running between two looks.
#[derive(Debug)]
pub struct PauseDetector {
    last: Instant,
}

impl Default for PauseDetector {
    fn default() -> Self {
        Self::new()
    }
}

impl PauseDetector {
    pub fn new() -> PauseDetector {
        PauseDetector {
            last: Instant::now(),
        }
    }

    /// The time since the previous look: `Err(gap)` when it was a pause.
    pub fn look(&mut self) -> Result<Duration, Duration> {
        self.look_at(Instant::now())
    }

    fn look_at(&mut self, now: Instant) -> Result<Duration, Duration> {
        let d = now.saturating_duration_since(self.last);
        self.last = now;
        if d > PAUSE_GAP {
            Err(d)
        } else {
            Ok(d)
        }
    }
}

/// Awake time since the last [`reset`](Self::reset).
#[derive(Debug, Default)]
pub struct AwakeClock {
    pause: PauseDetector,
    counted: Duration,
}

impl AwakeClock {
    pub fn new() -> AwakeClock {
        AwakeClock::default()
    }

    /// Starts counting from zero, now.
    pub fn reset(&mut self) {
        self.counted = Duration::ZERO;
        let _ = self.pause.look();
    }

    /// Counts the time since the previous look, unless it was a pause;
    /// returns the pause's length when it was.
    pub fn look(&mut self) -> Option<Duration> {
        self.look_at(Instant::now())
    }

    fn look_at(&mut self, now: Instant) -> Option<Duration> {
        match self.pause.look_at(now) {
            Ok(d) => {
                self.counted += d;
                None
            }
            Err(gap) => Some(gap),
        }
    }

    /// Awake time counted so far.
    pub fn counted(&self) -> Duration {
        self.counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_awake_time_and_skips_pauses() {
        let mut c = AwakeClock::new();
        let mut t = c.pause.last;
        let s = Duration::from_secs;
        for _ in 0..5 {
            t += s(1);
            assert_eq!(c.look_at(t), None);
        }
        assert_eq!(c.counted(), s(5));
        t += s(180);
        assert_eq!(c.look_at(t), Some(s(180)));
        assert_eq!(c.counted(), s(5));
        t += s(2);
        assert_eq!(c.look_at(t), None);
        assert_eq!(c.counted(), s(7));
        // A clock that went backwards (it cannot, but) counts nothing.
        assert_eq!(c.look_at(t - s(1)), None);
        assert_eq!(c.counted(), s(7));
    }
}
