//! Error chains in log lines: an error and each of its causes, once.

use std::error::Error;
use std::fmt;

/// Displays `error: cause: cause…`. A cause whose text ends the line so far
/// is skipped, so an error that still repeats its source in its own
/// message does not print it twice.
pub(crate) struct Chain<'a>(pub(crate) &'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot listen on {0}")]
        Clean(&'static str, #[source] std::io::Error),
        #[error("write failed: {0}")]
        Repeats(#[source] std::io::Error),
    }

    #[test]
    fn each_cause_once() {
        let busy = || std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        let clean = Outer::Clean("[::1]:10809", busy());
        assert_eq!(
            Chain(&clean).to_string(),
            format!("cannot listen on [::1]:10809: {}", busy())
        );
        let repeats = Outer::Repeats(busy());
        assert_eq!(
            Chain(&repeats).to_string(),
            format!("write failed: {}", busy())
        );
    }
}
