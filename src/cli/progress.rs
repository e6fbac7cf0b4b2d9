//! Progress of imports and exports: a bar with bytes, rate and ETA on a
//! terminal, a plain line every few seconds otherwise (logs, CI).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use vbd::lock::MutexExt;
use vbd::volume::object::transfer::Progress;

/// How often a plain line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// A transfer's progress, shown on stderr.
pub(crate) struct Shown {
    what: String,
    bar: Option<ProgressBar>,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    /// When the last plain line was printed.
    last: Mutex<Instant>,
}

impl Shown {
    /// Progress of `what` ("importing os"), as a bar on a terminal.
    pub(crate) fn new(what: &str) -> Shown {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            b.set_style(style);
            b.set_message(what.to_owned());
            b
        });
        Shown {
            what: what.to_owned(),
            bar,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: Instant::now(),
            last: Mutex::new(Instant::now()),
        }
    }

    fn line(&self) -> String {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(total);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0}s", (total - done) as f64 / rate)
        } else {
            "?".into()
        };
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        format!(
            "{}: {} of {} ({pct}%), {}/s, ETA {eta}",
            self.what,
            HumanBytes(done),
            HumanBytes(total),
            HumanBytes(rate as u64)
        )
    }

    /// Ends the bar, or prints the last plain line.
    pub(crate) fn finish(&self) {
        match &self.bar {
            Some(b) => b.finish(),
            None => eprintln!("{}", self.line()),
        }
    }

    /// Sets the done count outright (for tools that report a percentage).
    pub(crate) fn set_done(&self, bytes: u64) {
        let now = self.done.load(Ordering::Relaxed);
        if bytes > now {
            self.advance(bytes - now);
        }
    }
}

impl Progress for Shown {
    fn total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_length(bytes);
        }
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        match &self.bar {
            Some(b) => b.inc(bytes),
            None => {
                let mut last = self.last.locked();
                if last.elapsed() >= PLAIN_EVERY {
                    *last = Instant::now();
                    eprintln!("{}", self.line());
                }
            }
        }
    }
}
