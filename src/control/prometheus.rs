//! The Prometheus text exposition format (version 0.0.4), written by hand:
//! it is a few lines of escaping, not worth a client library and its
//! registry of global metrics.

use std::fmt::{Display, Write};

/// The Content-Type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A value that only grows (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Observations counted in cumulative buckets, with a sum and a count.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// An exposition being written; every family's samples must follow its
/// [`Text::family`] line before the next family starts.
#[derive(Default)]
pub struct Text {
    out: String,
}

impl Text {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram's samples: `buckets` are (upper bound, count in that
    /// bucket alone) in increasing order, `overflow` the count above the
    /// last bound; written cumulatively with `le`, then `_sum` and `_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: impl IntoIterator<Item = (String, u64)>,
        overflow: u64,
        sum: f64,
    ) {
        let bucket = format!("{name}_bucket");
        fn with_le<'a>(labels: &[(&'a str, &'a str)], le: &'a str) -> Vec<(&'a str, &'a str)> {
            let mut l = labels.to_vec();
            l.push(("le", le));
            l
        }
        let mut total = 0u64;
        for (le, n) in buckets {
            total += n;
            self.sample(&bucket, &with_le(labels, &le), total);
        }
        total += overflow;
        self.sample(&bucket, &with_le(labels, "+Inf"), total);
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, total);
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// `us` microseconds as a decimal number of seconds, exactly ("0.000512").
pub fn seconds_from_us(us: u64) -> String {
    let (s, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        return s.to_string();
    }
    let f = format!("{frac:06}");
    format!("{s}.{}", f.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_labels_and_histograms() {
        let mut t = Text::new();
        t.family("x_total", Kind::Counter, "A count\nof \\things.");
        t.sample("x_total", &[("a", "q\"b\\c\nd"), ("op", "read")], 3u64);
        t.family("lat_seconds", Kind::Histogram, "Latency.");
        t.histogram(
            "lat_seconds",
            &[("op", "read")],
            [(seconds_from_us(1), 2u64), (seconds_from_us(2), 0)],
            1,
            0.25,
        );
        t.single("g", Kind::Gauge, "G.", 1.5f64);
        assert_eq!(
            t.finish(),
            "# HELP x_total A count\\nof \\\\things.\n# TYPE x_total counter\n\
             x_total{a=\"q\\\"b\\\\c\\nd\",op=\"read\"} 3\n\
             # HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n\
             lat_seconds_bucket{op=\"read\",le=\"0.000001\"} 2\n\
             lat_seconds_bucket{op=\"read\",le=\"0.000002\"} 2\n\
             lat_seconds_bucket{op=\"read\",le=\"+Inf\"} 3\n\
             lat_seconds_sum{op=\"read\"} 0.25\n\
             lat_seconds_count{op=\"read\"} 3\n\
             # HELP g G.\n# TYPE g gauge\ng 1.5\n"
        );
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds_from_us(1), "0.000001");
        assert_eq!(seconds_from_us(1024), "0.001024");
        assert_eq!(seconds_from_us(1 << 25), "33.554432");
        assert_eq!(seconds_from_us(2_000_000), "2");
    }
}
