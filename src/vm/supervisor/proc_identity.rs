//! Whether a pid is still the QEMU this supervisor started. A pid alone
//! proves nothing once vbd has been away: QEMU may have exited and the
//! kernel handed its pid to any new process. What stays fixed for one
//! process is its start time (`/proc/PID/stat` field 22, clock ticks since
//! boot) within one boot (`/proc/sys/kernel/random/boot_id`); the
//! executable and the command line confirm it is QEMU with our arguments.
//! Parsing is sans-IO; [`ProcIdentity::read`] and [`ProcIdentity::check`]
//! do the reading.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What identifies one process for as long as it lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ProcIdentity {
    /// `/proc/PID/stat` field 22: when it started, in ticks since boot.
    pub start_ticks: u64,
    /// The boot it started in: ticks restart at every boot.
    pub boot_id: String,
    /// `/proc/PID/exe`, without the " (deleted)" an upgraded binary gets.
    pub exe: PathBuf,
    /// `/proc/PID/cmdline`, one string per argument.
    pub cmdline: Vec<String>,
}

/// What [`ProcIdentity::check`] found at a pid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The same process, still running.
    Same,
    /// No process has that pid now (or only its zombie is left).
    Gone,
    /// Another process has the pid; `what` describes it for the log.
    Other { what: String },
}

/// The state letter and start time from the text of `/proc/PID/stat`.
/// The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted after the last `)`.
pub(super) fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Field 3 (state) is the first after the name; 22 is 19 further on.
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The command name (field 2) from the text of `/proc/PID/stat`.
fn stat_comm(stat: &str) -> &str {
    match (stat.find('('), stat.rfind(')')) {
        (Some(a), Some(b)) if a < b => &stat[a + 1..b],
        _ => "?",
    }
}

/// `/proc/PID/cmdline`'s NUL-separated arguments.
pub(super) fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    bytes
        .strip_suffix(b"\0")
        .unwrap_or(bytes)
        .split(|b| *b == 0)
        .filter(|_| !bytes.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The executable a `/proc/PID/exe` link names; a binary replaced on disk
/// (a QEMU package upgrade under a running VM) reads as "PATH (deleted)".
pub(super) fn exe_path(link: &Path) -> PathBuf {
    let s = link.to_string_lossy();
    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
}

fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

fn proc_path(pid: u32, what: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{what}"))
}

impl ProcIdentity {
    /// Reads the identity of the running process `pid`. Call it after
    /// QEMU has exec'd (once QMP answers): before that the pid is still a
    /// copy of vbd.
    pub(super) fn read(pid: u32) -> std::io::Result<ProcIdentity> {
        let stat = std::fs::read_to_string(proc_path(pid, "stat"))?;
        let (_, start_ticks) = parse_stat(&stat).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("cannot parse /proc/{pid}/stat"),
            )
        })?;
        Ok(ProcIdentity {
            start_ticks,
            boot_id: boot_id()?,
            exe: exe_path(&std::fs::read_link(proc_path(pid, "exe"))?),
            cmdline: parse_cmdline(&std::fs::read(proc_path(pid, "cmdline"))?),
        })
    }

    /// Whether `pid` is still this process. Anything that cannot be read
    /// (a process of another user hides its exe) counts as another process:
    /// a pid is only ever adopted, or signalled, when everything matches.
    pub(super) fn check(&self, pid: u32) -> Verdict {
        let stat = match std::fs::read_to_string(proc_path(pid, "stat")) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Verdict::Gone,
            Err(e) => {
                return Verdict::Other {
                    what: format!("unreadable ({e})"),
                };
            }
        };
        let comm = stat_comm(&stat).to_owned();
        let other = |why: &str| Verdict::Other {
            what: format!("{comm:?}: {why}"),
        };
        let Some((state, start_ticks)) = parse_stat(&stat) else {
            return other("unparsable /proc stat");
        };
        if start_ticks != self.start_ticks || boot_id().ok().as_ref() != Some(&self.boot_id) {
            return other("started at another time");
        }
        // A zombie is QEMU that has exited, waiting for its parent (no
        // longer vbd) to reap it.
        if state == 'Z' {
            return Verdict::Gone;
        }
        match std::fs::read_link(proc_path(pid, "exe")) {
            Ok(l) if exe_path(&l) == self.exe => {}
            Ok(l) => return other(&format!("runs {}", l.display())),
            Err(e) => return other(&format!("exe unreadable ({e})")),
        }
        match std::fs::read(proc_path(pid, "cmdline")) {
            Ok(c) if parse_cmdline(&c) == self.cmdline => Verdict::Same,
            Ok(_) => other("another command line"),
            Err(e) => other(&format!("cmdline unreadable ({e})")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_after_the_last_parenthesis() {
        // A name with spaces and parentheses, as `prctl(PR_SET_NAME)` allows.
        let stat = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 5000 0 0 0 \
                    120 30 0 0 20 0 5 0 987654 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
        assert_eq!(stat_comm(stat), "qemu (x) 1");
        assert_eq!(parse_stat("1 (init) S 0"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn cmdline_and_exe() {
        assert_eq!(
            parse_cmdline(b"qemu\0-name\0guest=a,debug-threads=on\0"),
            ["qemu", "-name", "guest=a,debug-threads=on"]
        );
        assert_eq!(parse_cmdline(b"a\0\0b\0"), ["a", "", "b"]);
        assert!(parse_cmdline(b"").is_empty());
        assert_eq!(
            exe_path(Path::new("/usr/bin/qemu-system-x86_64 (deleted)")),
            Path::new("/usr/bin/qemu-system-x86_64")
        );
    }

    #[test]
    fn this_process_is_itself_and_a_child_is_not() {
        let me = ProcIdentity::read(std::process::id()).unwrap();
        assert_eq!(me.check(std::process::id()), Verdict::Same);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let verdict = me.check(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            matches!(&verdict, Verdict::Other { what } if what.contains("sleep")),
            "{verdict:?}"
        );
        // Reaped: nothing has the pid (until the kernel reuses it).
        let reaped = child.id();
        if std::fs::metadata(format!("/proc/{reaped}")).is_err() {
            assert_eq!(me.check(reaped), Verdict::Gone);
        }
    }

    #[test]
    fn an_exited_unreaped_process_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let id = ProcIdentity::read(pid).unwrap();
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        let zombie = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
                .is_some_and(|(state, _)| state == 'Z')
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !zombie() {
            assert!(std::time::Instant::now() < deadline, "no zombie");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(id.check(pid), Verdict::Gone);
        child.wait().unwrap();
    }
}
