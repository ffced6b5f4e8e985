//! Progress of `snapship sync`: a live bar per replica (bytes, rate, elapsed) when stdout is
//! a terminal, a plain line every few seconds otherwise (logs, cron mails). btrfs cannot tell
//! a stream's size before sending it, so there is no percentage or ETA.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::ship::meter::Tally;

struct Stream {
    replica: String,
    tally: Arc<Tally>,
    bar: Option<ProgressBar>,
    started: Instant,
}

pub struct Progress {
    bars: Option<MultiProgress>,
    streams: Mutex<Vec<Stream>>,
    stop: CancellationToken,
}

impl Progress {
    /// Starts reporting; stop with [`Progress::finish`].
    pub fn start(fileset: &str) -> Arc<Progress> {
        let bars = std::io::stdout().is_terminal().then(MultiProgress::new);
        let p = Arc::new(Progress { bars, streams: Mutex::default(), stop: CancellationToken::new() });
        let me = p.clone();
        let fileset = fileset.to_string();
        tokio::spawn(async move {
            let every = if me.bars.is_some() { Duration::from_millis(200) } else { Duration::from_secs(5) };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = me.stop.cancelled() => return,
                    _ = tick.tick() => me.report(&fileset),
                }
            }
        });
        p
    }

    /// A stream to `replica` started.
    pub fn add(&self, replica: &str, tally: Arc<Tally>) {
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(ProgressStyle::with_template("{spinner} {prefix}: {bytes} at {binary_bytes_per_sec} ({elapsed})").expect("valid template"));
            bar.set_prefix(replica.to_string());
            bar
        });
        self.streams.lock().expect("progress lock").push(Stream { replica: replica.to_string(), tally, bar, started: Instant::now() });
    }

    fn report(&self, fileset: &str) {
        for s in self.streams.lock().expect("progress lock").iter() {
            let bytes = s.tally.bytes();
            match &s.bar {
                Some(bar) => bar.set_position(bytes),
                None => {
                    let secs = s.started.elapsed().as_secs_f64();
                    eprintln!(
                        "{fileset} -> {}: {} sent, {}/s",
                        s.replica,
                        bytesize::ByteSize(bytes).display().iec(),
                        bytesize::ByteSize((bytes as f64 / secs.max(0.001)) as u64).display().iec()
                    );
                }
            }
        }
    }

    pub fn finish(&self) {
        self.stop.cancel();
        for s in self.streams.lock().expect("progress lock").iter() {
            if let Some(bar) = &s.bar {
                bar.set_position(s.tally.bytes());
                bar.finish();
            }
        }
    }
}
