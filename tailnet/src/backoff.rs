//! Exponential backoff with jitter, for every redial in the client (the
//! coordinate websocket, each DERP region).
//!
//! The delay doubles from `min` up to `max`; each delay handed out is drawn
//! from its upper half (`[d/2, d]`, "equal jitter"), so many clients that
//! lost the same relay at the same moment do not come back in lockstep, and
//! no delay ever exceeds `max`.

use std::time::Duration;

use rand_core::{OsRng, RngCore};

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.min(max);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt; each call doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        jitter(d, OsRng.next_u32())
    }

    /// After a success: the next failure starts again from `min`.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// `d/2 + (d/2 · r / 2³²)`: in `[d/2, d)`.
fn jitter(d: Duration, r: u32) -> Duration {
    let half = d / 2;
    let extra = (half.as_nanos() * u128::from(r)) >> 32;
    half + Duration::from_nanos(u64::try_from(extra).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(8));
        let mut b = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            ceiling = (ceiling * 2).min(max);
        }
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn jitter_bounds() {
        let d = Duration::from_secs(8);
        assert_eq!(jitter(d, 0), Duration::from_secs(4));
        assert!(jitter(d, u32::MAX) < d);
        assert!(jitter(d, u32::MAX) > Duration::from_millis(7999));
        assert_eq!(jitter(Duration::ZERO, 12345), Duration::ZERO);
    }
}
