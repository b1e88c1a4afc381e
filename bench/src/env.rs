//! Facts about the run that go into every result line: git commit, nproc, kernel, UTC date; and the
//! progress line on stderr.
//!
//! Owns: gathering those facts without extra dependencies (the date is computed from the Unix time
//! here rather than pulling in a calendar crate). Does not own: the scenario figures.

use std::io::{IsTerminal, Write};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// `{ git_commit, nproc, kernel, date_utc }`.
pub fn run_info() -> Value {
    json!({
        "git_commit": git_commit(),
        "nproc": nproc(),
        "kernel": kernel(),
        "date_utc": iso8601_utc(SystemTime::now()),
    })
}

/// Online CPUs.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn git_commit() -> String {
    let from_dir = |dir: Option<std::path::PathBuf>| -> Option<String> {
        let mut command = Command::new("git");
        command.args(["rev-parse", "--short", "HEAD"]);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let output = command.stderr(std::process::Stdio::null()).output().ok()?;
        let text = String::from_utf8(output.stdout).ok()?.trim().to_string();
        (output.status.success() && !text.is_empty()).then_some(text)
    };
    // The working directory first, then the directory of the binary, then the source tree it was
    // built from (a run from elsewhere, e.g. a scratch directory).
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.to_path_buf()));
    from_dir(None)
        .or_else(|| from_dir(exe_dir))
        .or_else(|| from_dir(Some(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))))
        .unwrap_or_else(|| "unknown".to_string())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso8601_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, secs_of_day) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

/// Writes a progress line on stderr when stderr is a terminal (carriage return, no newline, so it
/// overwrites itself); does nothing otherwise.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    printed: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress { enabled: std::io::stderr().is_terminal(), printed: false }
    }

    pub fn line(&mut self, text: &str) {
        if self.enabled {
            let _ = write!(std::io::stderr(), "\r\x1b[2K{text}");
            self.printed = true;
        }
    }

    pub fn finish(&mut self) {
        if self.printed {
            let _ = writeln!(std::io::stderr());
            self.printed = false;
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn iso8601_known_dates() {
        assert_eq!(iso8601_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601_utc(UNIX_EPOCH + Duration::from_secs(1_735_689_599)), "2024-12-31T23:59:59Z");
    }
}
