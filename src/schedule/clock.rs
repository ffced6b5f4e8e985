//! The time the scheduler sees. Real time in production; in tests a fake clock that moves
//! with tokio's paused time, so cron firing is tested in simulated hours.

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    /// `start` at the tokio instant `origin`, then moving with tokio time.
    Fake {
        start: DateTime<Utc>,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    pub fn fake(start: DateTime<Utc>) -> Clock {
        Clock::Fake { start, origin: tokio::time::Instant::now() }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Fake { start, origin } => *start + chrono::Duration::from_std(origin.elapsed()).expect("test durations fit"),
        }
    }

    /// Sleeps until the wall-clock time `t` (immediately if it has passed).
    pub async fn sleep_until(&self, t: DateTime<Utc>) {
        if let Ok(wait) = t.signed_duration_since(self.now()).to_std() {
            tokio::time::sleep(wait).await;
        }
    }
}
