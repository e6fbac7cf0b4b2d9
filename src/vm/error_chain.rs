//! An error and its causes on one line, each printed once. The error types
//! here keep a cause out of their own message (it is reached through
//! `source()`), so wherever an error becomes plain text (a log line, the
//! control API's error body, a rollback note) it goes through [`ErrorChain`].

use std::error::Error;
use std::fmt;

/// Displays `error: cause: cause's cause`.
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::qmp::QmpError;

    #[test]
    fn prints_each_cause_once_in_order() {
        let e = QmpError::Connect {
            path: "/run/q.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let text = ErrorChain(&e).to_string();
        assert_eq!(
            text,
            "cannot connect to QMP socket /run/q.sock: connection refused"
        );
        let io = std::io::Error::other(e);
        // io::Error shows its inner error, then forwards to that error's cause.
        assert_eq!(ErrorChain(&io).to_string(), text);
    }
}
