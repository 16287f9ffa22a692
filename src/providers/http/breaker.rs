//! A circuit breaker per target (the management platform, or one tenant's ISP instance), as
//! the configuration-schema seed has it: closed → open after `failures` consecutive failures
//! → half-open once `reset_after` has passed (one trial call) → closed on success, open again
//! on failure. An open breaker refuses calls at once, so a dead target costs its tenant one
//! fast error instead of every caller's timeouts.
//!
//! The clock is passed in (`Instant`), so the transitions are tested without sleeping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct Target {
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    /// Half-open: the one trial call is under way.
    trial: bool,
}

#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    reset_after: Duration,
    targets: Mutex<HashMap<String, Target>>,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub consecutive_failures: u32,
    /// How long until a trial call is let through.
    pub retry_in: Duration,
}

impl Breaker {
    pub fn new(failures: u32, reset_after: Duration) -> Breaker {
        Breaker { failures: failures.max(1), reset_after, targets: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Target>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self, target: &str, now: Instant) -> State {
        match self.lock().get(target) {
            Some(Target { opened_at: Some(at), trial, .. }) => {
                if *trial || now.duration_since(*at) >= self.reset_after { State::HalfOpen } else { State::Open }
            }
            _ => State::Closed,
        }
    }

    /// May a call go to `target` now? In half-open, only one trial call at a time.
    pub fn allow(&self, target: &str, now: Instant) -> Result<(), Refused> {
        let mut targets = self.lock();
        let Some(t) = targets.get_mut(target) else { return Ok(()) };
        let Some(at) = t.opened_at else { return Ok(()) };
        let elapsed = now.duration_since(at);
        if elapsed >= self.reset_after && !t.trial {
            t.trial = true;
            return Ok(());
        }
        Err(Refused {
            consecutive_failures: t.consecutive_failures,
            retry_in: self.reset_after.saturating_sub(elapsed),
        })
    }

    pub fn success(&self, target: &str) {
        self.lock().remove(target);
    }

    /// Records a failed call; returns true when this failure opened the breaker.
    pub fn failure(&self, target: &str, now: Instant) -> bool {
        let mut targets = self.lock();
        let t = targets.entry(target.to_owned()).or_insert(Target {
            consecutive_failures: 0,
            opened_at: None,
            trial: false,
        });
        t.consecutive_failures = t.consecutive_failures.saturating_add(1);
        let was_trial = std::mem::replace(&mut t.trial, false);
        if was_trial || (t.opened_at.is_none() && t.consecutive_failures >= self.failures) {
            t.opened_at = Some(now);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_open_half_open_closed() {
        let b = Breaker::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(!b.failure("isp-a", t0));
        assert!(!b.failure("isp-a", t0));
        assert_eq!(b.state("isp-a", t0), State::Closed);
        assert!(b.allow("isp-a", t0).is_ok());
        assert!(b.failure("isp-a", t0), "the third consecutive failure opens it");
        assert_eq!(b.state("isp-a", t0), State::Open);
        let refused = b.allow("isp-a", t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(refused, Refused { consecutive_failures: 3, retry_in: Duration::from_secs(20) });
        // Another target is not affected.
        assert!(b.allow("isp-b", t0).is_ok());
        // After reset_after: one trial call, the others still refused.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(b.state("isp-a", later), State::HalfOpen);
        assert!(b.allow("isp-a", later).is_ok());
        assert!(b.allow("isp-a", later).is_err());
        b.success("isp-a");
        assert_eq!(b.state("isp-a", later), State::Closed);
        assert!(b.allow("isp-a", later).is_ok());
    }

    #[test]
    fn a_failed_trial_opens_it_again_and_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(5));
        let t0 = Instant::now();
        b.failure("m", t0);
        b.success("m");
        assert!(!b.failure("m", t0), "the count restarted after a success");
        assert!(b.failure("m", t0));
        let t1 = t0 + Duration::from_secs(6);
        assert!(b.allow("m", t1).is_ok());
        assert!(b.failure("m", t1), "a failed trial opens it again");
        assert!(b.allow("m", t1 + Duration::from_secs(1)).is_err());
        assert!(b.allow("m", t1 + Duration::from_secs(5)).is_ok());
    }
}
