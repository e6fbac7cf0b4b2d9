//! Printing an error with its causes.
//!
//! vbd's error types print each cause once: a variant that carries a source
//! says what failed and leaves the why to `source()`. Whoever reports an
//! error to a person (a log line, the binary's last words) walks the chain;
//! [`Chain`] is that walk for logs, where a JSON formatter would otherwise
//! keep only the outermost message.

use std::error::Error;
use std::fmt;

/// Displays `error: cause: cause…`, each cause once. A cause whose text
/// already ends the line so far is skipped: third-party errors (object_store's,
/// for one) repeat their source in their own message.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the thing")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("write failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn a_cause_the_message_already_shows_is_not_repeated() {
        let e = Repeats(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            Chain(&e).to_string(),
            "write failed: No space left on device (os error 28)"
        );
    }

    #[test]
    fn each_cause_once_in_order() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            Chain(&e).to_string(),
            "cannot open the thing: No such file or directory (os error 2)"
        );
    }
}
