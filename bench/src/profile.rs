//! A CPU profile of one process while a measurement runs: `perf record` attached to it, then
//! the top frames by self time from `perf report`, for BENCHMARKS.md.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One line of the report: a function and its share of the process's samples.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    pub percent: f64,
    /// `k` for the kernel, `.` for user space (perf's notation).
    pub space: char,
    pub symbol: String,
}

/// A `perf record` running against a process; stopped and read by [`Recording::finish`].
#[derive(Debug)]
pub struct Recording {
    child: Option<Child>,
    data: PathBuf,
}

/// Sampling rate: odd, so it does not beat with the kernel's 1,000 Hz tick.
const HZ: &str = "999";

impl Recording {
    /// Starts sampling `pid` (all its threads, user and kernel) into `data`.
    pub fn start(pid: u32, data: &Path) -> Result<Recording> {
        let child = Command::new("perf")
            .args(["record", "-F", HZ, "-g", "-p", &pid.to_string(), "-o"])
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run perf (apt install linux-perf)")?;
        let mut r = Recording { child: Some(child), data: data.to_owned() };
        // perf writes the file header once it is attached; wait for it so no sample is missed.
        let t = std::time::Instant::now();
        while std::fs::metadata(data).map_or(0, |m| m.len()) == 0 {
            if let Some(st) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("perf record exited at once ({st})");
            }
            if t.elapsed() > std::time::Duration::from_secs(10) {
                bail!("perf record did not start within 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(r)
    }

    /// Stops sampling and returns the frames above `min_percent` of the samples.
    pub fn finish(mut self, min_percent: f64) -> Result<Vec<Frame>> {
        let mut child = self.child.take().expect("running");
        // SIGINT: perf flushes and finalises the file.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait()?;
        let out = Command::new("perf")
            .args(["report", "--no-children", "--sort", "symbol", "--stdio", "-g", "none"])
            .arg(format!("--percent-limit={min_percent}"))
            .arg("-i")
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("cannot run perf report")?;
        Ok(parse_report(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lines like `    15.81%  [.] __memmove_avx_unaligned_erms`.
fn parse_report(text: &str) -> Vec<Frame> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (pct, rest) = l.split_once('%')?;
            let percent: f64 = pct.trim().parse().ok()?;
            let rest = rest.trim_start();
            let space = match rest.get(..3)? {
                "[k]" => 'k',
                "[.]" => '.',
                _ => return None,
            };
            // Symbols may contain spaces (`<A as B>::f`); perf pads the line with `-` columns.
            let symbol = rest[3..].trim().trim_end_matches([' ', '-']).to_string();
            Some(Frame { percent, space, symbol })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_parsed_and_headers_skipped() {
        let text = "# Samples: 930\n#\n    15.81%  [.] __memmove_avx_unaligned_erms   -  -\n     5.81%  [k] __pi_memcpy  -  -\n     1.29%  [.] <a::B as c::D>::send   -      -\n\n";
        let f = parse_report(text);
        assert_eq!(f.len(), 3);
        assert_eq!(f[2].symbol, "<a::B as c::D>::send");
        assert_eq!((f[0].percent, f[0].space, f[0].symbol.as_str()), (15.81, '.', "__memmove_avx_unaligned_erms"));
        assert_eq!((f[1].space, f[1].symbol.as_str()), ('k', "__pi_memcpy"));
    }
}
