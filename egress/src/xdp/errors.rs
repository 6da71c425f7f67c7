//! Why kernel liveness is unavailable, from aya's errors: each variant says what to do.

use aya::programs::ProgramError;
use aya::EbpfError;
use std::io;

/// Why kernel liveness is not available (each variant says what to do about it).
#[derive(Debug, thiserror::Error)]
pub enum XdpUnavailable {
    #[error("the XDP program is not built into this binary (run `cargo xtask build-ebpf`, then rebuild the egress)")]
    NotBuilt,
    #[error("invalid XDP settings: {0}")]
    InvalidConfig(String),
    #[error("not permitted to load eBPF programs ({0}): run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")]
    Permission(String),
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux is missing); the XDP program needs it")]
    NoBtf,
    #[error("the kernel refused the XDP program: {reason}; verifier log (last lines):\n{log}")]
    ProgramLoad { reason: String, log: String },
    #[error("cannot create the eBPF map {map}: {reason}")]
    MapCreation { map: String, reason: String },
    #[error("cannot attach to interface {interface}: native XDP refused ({native}), TC ingress refused ({tc}) and generic XDP refused too ({generic})")]
    Attach { interface: String, native: String, tc: String, generic: String },
    #[error("no network interface named {0}")]
    NoSuchInterface(String),
    #[error("cannot set up the XDP program: {0}")]
    Setup(String),
}

fn is_eperm(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// The last lines of a verifier log (the error is at its end).
fn trim_log(log: &str) -> String {
    const LINES: usize = 30;
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(LINES);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("… ({start} lines omitted)\n"));
    }
    out.push_str(&lines[start..].join("\n"));
    out
}

pub(super) fn program_error(e: ProgramError) -> XdpUnavailable {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            if is_eperm(&io_error) {
                XdpUnavailable::Permission(format!("program load: {io_error}"))
            } else {
                XdpUnavailable::ProgramLoad { reason: io_error.to_string(), log: trim_log(&verifier_log.to_string()) }
            }
        }
        ProgramError::SyscallError(s) if is_eperm(&s.io_error) => {
            XdpUnavailable::Permission(format!("{}: {}", s.call, s.io_error))
        }
        ProgramError::MapError(m) => map_error(m),
        other => XdpUnavailable::Setup(other.to_string()),
    }
}

pub(super) fn map_error(e: aya::maps::MapError) -> XdpUnavailable {
    match e {
        aya::maps::MapError::CreateError { name, io_error } => {
            if is_eperm(&io_error) {
                XdpUnavailable::Permission(format!("creating map {name}: {io_error}"))
            } else {
                XdpUnavailable::MapCreation { map: name, reason: io_error.to_string() }
            }
        }
        aya::maps::MapError::SyscallError(s) if is_eperm(&s.io_error) => {
            XdpUnavailable::Permission(format!("{}: {}", s.call, s.io_error))
        }
        other => XdpUnavailable::Setup(other.to_string()),
    }
}

pub(super) fn ebpf_error(e: EbpfError) -> XdpUnavailable {
    match e {
        EbpfError::MapError(m) => map_error(m),
        EbpfError::ProgramError(p) => program_error(p),
        EbpfError::NoBTF => XdpUnavailable::NoBtf,
        other => XdpUnavailable::Setup(other.to_string()),
    }
}
