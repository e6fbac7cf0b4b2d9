//! Printing an error with its causes.
//!
//! vbd's error types print each cause once: a variant that carries a source
//! says what failed and leaves the why to `source()`. Whoever reports an
//! error to a person (a log line, the binary's last words) walks the chain;
//! [`ErrorChain`] is that walk for logs, where a JSON formatter would otherwise
//! keep only the outermost message.

use std::error::Error;
use std::fmt;

/// Displays an error and each of its sources, joined by ": ".
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorChain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the thing")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_once_in_order() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot open the thing: No such file or directory (os error 2)"
        );
    }
}
