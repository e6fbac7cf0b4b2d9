//! Human-friendly byte sizes: `4096`, `64K`, `512M`, `1G`, `2TiB`, as the
//! command line and the control API's JSON both accept them.

use thiserror::Error;

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    /// No leading digits.
    #[error("size {0:?} must start with a number, like 512M or 1G")]
    NotANumber(String),
    /// A suffix other than K, M, G, T or P (binary multiples).
    #[error("size {0:?} has an unknown suffix; use K, M, G, T or P")]
    UnknownSuffix(String),
    /// The size in bytes does not fit in a u64.
    #[error("size {0:?} is too large")]
    TooLarge(String),
}

/// Parses a size with an optional binary suffix (K, M, G, T, P; with or
/// without `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::NotANumber(s.to_owned()))?;
    let shift = match suffix
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(SizeError::UnknownSuffix(s.to_owned())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("3mb"), Ok(3 << 20));
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999P").is_err());
    }
}
