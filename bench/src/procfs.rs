//! Measurements of another process from /proc.

/// Resident set size of `pid` in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Proportional set size of `pid` in bytes (smaps_rollup Pss).
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines().find(|l| l.starts_with("Pss:"))?.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// CPU seconds `pid` has used (all threads), split into user space and kernel (system).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    pub fn total(&self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for CpuTimes {
    type Output = CpuTimes;
    fn sub(self, o: CpuTimes) -> CpuTimes {
        CpuTimes { user: self.user - o.user, system: self.system - o.system }
    }
}

pub fn cpu_times(pid: u32) -> Option<CpuTimes> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(CpuTimes { user: utime / hz, system: stime / hz })
}

/// Voluntary + involuntary context switches of every thread of `pid` (a proxy for wakeups).
pub fn context_switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        // A thread that ended between the listing and the read no longer counts.
        let Ok(s) = std::fs::read_to_string(t.path().join("status")) else { continue };
        for l in s.lines() {
            if l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:") {
                total += l.split_whitespace().nth(1)?.parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

/// CPU time of every thread of `pid` in nanoseconds (the scheduler's own clock, from
/// `/proc/PID/task/TID/schedstat`: user and system together, no tick resolution).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let s = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Kernel memory of the BPF maps `pid` holds (`memlock` in each map's fdinfo).
pub fn bpf_map_bytes(pid: u32) -> Option<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if !std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("bpf-map")) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).ok()?;
        total += info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse::<u64>().ok())?;
    }
    Some(total)
}

/// TCP sockets in use on the host (`/proc/net/sockstat`).
pub fn tcp_in_use() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let l = s.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = l.split_whitespace().collect();
    f.iter().position(|w| *w == "inuse").and_then(|i| f.get(i + 1)?.parse().ok())
}

/// Open file descriptors of `pid`.
pub fn fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Direct descriptors of `pid`: files in the registered tables of its io_uring instances
/// (listed in each ring's fdinfo between `UserFiles:` and `UserBufs:`), which `fds` does
/// not see.
pub fn direct_descriptors(pid: u32) -> Option<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if !std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("io_uring")) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()))
        else {
            continue;
        };
        n += info
            .lines()
            .skip_while(|l| !l.starts_with("UserFiles:"))
            .skip(1)
            .take_while(|l| !l.starts_with("UserBufs:"))
            .count() as u64;
    }
    Some(n)
}

/// Bytes held in slab caches (active objects × object size), per cache. Kernel memory of
/// sockets shows up here (TCP, sock_inode_cache, dentry, …).
pub fn slab() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(s) = std::fs::read_to_string("/proc/slabinfo") {
        for l in s.lines().skip(2) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 3 {
                if let (Ok(active), Ok(size)) = (f[1].parse::<u64>(), f[3].parse::<u64>()) {
                    out.insert(f[0].to_string(), active * size);
                }
            }
        }
    }
    out
}
