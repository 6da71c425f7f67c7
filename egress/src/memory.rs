//! The process's memory policy, applied once at start-up before the runtime's threads exist.
//!
//! Transparent huge pages are off for this process by default: with the kernel's common
//! `madvise` mode, the allocator's arenas are backed by 2 MiB pages, and an idle connection
//! then costs ≈440 B of resident memory instead of the ≈130 B it holds (docs/BENCHMARKS.md).
//! `PR_SET_THP_DISABLE` is per process, inherited by children, and needs no privilege. The
//! egress binary sets it before `main` (pages touched before it is set stay huge); `apply`
//! states the configured policy once the configuration is known.

use crate::config::HugePages;

/// What was applied, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub huge_pages: HugePages,
    /// The kernel's system-wide mode, e.g. `madvise` (None where /sys does not say).
    pub system_mode: Option<String>,
    /// Why the policy could not be applied, if it could not.
    pub error: Option<String>,
}

/// Applies the policy to this process.
pub fn apply(huge_pages: HugePages) -> Applied {
    let system_mode = system_thp_mode();
    // The binary turned them off before `main` already; this states the configured policy.
    let disable = match huge_pages {
        HugePages::Off => 1,
        HugePages::System => 0,
    };
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, disable, 0, 0, 0) };
    let error = (rc != 0).then(|| std::io::Error::last_os_error().to_string());
    Applied { huge_pages, system_mode, error }
}

/// The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled
/// (`always [madvise] never` → `madvise`).
fn system_thp_mode() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    parse_mode(&text)
}

fn parse_mode(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let system = self.system_mode.as_deref().unwrap_or("unknown");
        match (&self.huge_pages, &self.error) {
            (HugePages::Off, None) => {
                write!(f, "transparent huge pages off for this process (system mode: {system})")
            }
            (HugePages::Off, Some(e)) => {
                write!(f, "transparent huge pages could not be turned off ({e}); the system mode {system} applies")
            }
            (HugePages::System, None) => write!(f, "transparent huge pages as the system says: {system}"),
            (HugePages::System, Some(e)) => {
                write!(f, "transparent huge pages could not be turned back on ({e}); they stay off")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_mode_is_the_bracketed_word() {
        assert_eq!(parse_mode("always [madvise] never\n").as_deref(), Some("madvise"));
        assert_eq!(parse_mode("[always] madvise never").as_deref(), Some("always"));
        assert_eq!(parse_mode("garbage"), None);
    }
}
