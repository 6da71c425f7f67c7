//! Two NATs in network namespaces, for tests of the WebRTC hop with real parts:
//!
//! ```text
//!   consumer ns "a" 10.1.0.2 ── router "ra" (nftables masquerade) 203.0.113.2 ─┐
//!                                                                              ├─ bridge in "pub" 203.0.113.10
//!   volunteer ns "b" 10.2.0.2 ── router "rb" (nftables masquerade) 203.0.113.3 ─┘   (coturn, signaling,
//!                                                                                   egress, HTTP server)
//! ```
//!
//! With [`NatKind::EndpointIndependent`] the routers `masquerade` (source ports kept: the
//! mapping seen by STUN is the one a peer can use); with [`NatKind::Symmetric`] they
//! `masquerade random,fully-random` (a new port per flow: only TURN gets through). Private
//! addresses are unreachable across the NATs, as on the internet. Everything is removed when
//! the value is dropped, also when a test fails.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;

/// The public host's address (coturn, signaling, egress, the HTTP server).
pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const ROUTER_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const ROUTER_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
pub const HOST_A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const HOST_B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    EndpointIndependent,
    Symmetric,
}

/// The namespaces of one topology (names carry a per-test tag).
#[derive(Debug)]
pub struct Topology {
    pub public: String,
    pub router_a: String,
    pub router_b: String,
    pub a: String,
    pub b: String,
}

pub(crate) fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Why these tests cannot run here, if they cannot: they need root (CAP_NET_ADMIN) and the
/// Debian packages iproute2, nftables and coturn. Under CI every one is there, so there a
/// missing piece fails the test instead of skipping it.
pub fn unavailable() -> Option<String> {
    needs(&[("nft", "--version", "nftables"), ("turnserver", "-h", "coturn")])
}

/// Why namespace tests that use these tools — (command, an argument it accepts, its Debian
/// package) — cannot run here, or `None`: `ip netns` must work (root) and each command must
/// start. Under CI a missing piece panics instead.
pub(crate) fn needs(tools: &[(&str, &str, &str)]) -> Option<String> {
    let netns = Command::new("ip").args(["netns", "list"]).output().is_ok_and(|o| o.status.success());
    let why = if !netns {
        Some("`ip netns` does not work (not root?)".to_string())
    } else {
        tools
            .iter()
            .find(|(cmd, arg, _)| Command::new(cmd).arg(arg).output().is_err())
            .map(|(cmd, _, pkg)| format!("{cmd} is missing: apt-get install {pkg} (cargo xtask test installs it)"))
    };
    if let (Some(w), Ok(_)) = (&why, std::env::var("CI")) {
        panic!("required under CI: {w}");
    }
    why
}

/// Creates namespace `ns` afresh (a leftover of a killed test run is deleted first), loopback up.
pub(crate) fn fresh_namespace(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
    run(&["ip", "netns", "add", ns]);
    run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
}

impl Topology {
    /// Builds the topology; `tag` keeps parallel tests apart (a few characters).
    pub fn new(tag: &str, kind: NatKind) -> Topology {
        let id = format!("{tag}{}", std::process::id() % 10_000);
        let t = Topology {
            public: format!("bf-pub-{id}"),
            router_a: format!("bf-ra-{id}"),
            router_b: format!("bf-rb-{id}"),
            a: format!("bf-a-{id}"),
            b: format!("bf-b-{id}"),
        };
        for ns in t.all() {
            fresh_namespace(ns);
        }
        let p = t.public.as_str();
        run(&["ip", "-n", p, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", p, "link", "set", "br0", "up"]);
        run(&["ip", "-n", p, "addr", "add", &format!("{PUBLIC}/24"), "dev", "br0"]);
        // The rest of the internet: a default route into nowhere, so a packet to a private
        // address is sent and lost, as it is on a real host (without one, sendto fails, and
        // coturn ends the allocation that tried).
        run(&["ip", "-n", p, "link", "add", "internet", "type", "veth", "peer", "name", "void"]);
        run(&["ip", "-n", p, "link", "set", "void", "up"]);
        run(&["ip", "-n", p, "link", "set", "internet", "up"]);
        run(&["ip", "-n", p, "route", "add", "default", "dev", "internet"]);
        for (router, host_ns, public_ip, net) in
            [(&t.router_a, &t.a, ROUTER_A, "10.1.0"), (&t.router_b, &t.b, ROUTER_B, "10.2.0")]
        {
            let (r, h) = (router.as_str(), host_ns.as_str());
            // Router ↔ public bridge.
            run(&["ip", "-n", r, "link", "add", "wan", "type", "veth", "peer", "name", "port", "netns", p]);
            let port = format!("p{}", &r[3..5]);
            run(&["ip", "-n", p, "link", "set", "port", "name", &port]);
            run(&["ip", "-n", p, "link", "set", &port, "master", "br0", "up"]);
            run(&["ip", "-n", r, "addr", "add", &format!("{public_ip}/24"), "dev", "wan"]);
            run(&["ip", "-n", r, "link", "set", "wan", "up"]);
            // Router ↔ its host.
            run(&["ip", "-n", r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", h]);
            run(&["ip", "-n", r, "addr", "add", &format!("{net}.1/24"), "dev", "lan"]);
            run(&["ip", "-n", r, "link", "set", "lan", "up"]);
            run(&["ip", "-n", h, "addr", "add", &format!("{net}.2/24"), "dev", "eth0"]);
            run(&["ip", "-n", h, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", h, "route", "add", "default", "via", &format!("{net}.1")]);
            run(&["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            let masq = match kind {
                NatKind::EndpointIndependent => "masquerade",
                NatKind::Symmetric => "masquerade random,fully-random",
            };
            // A stateful NAT: what was not set up from inside is dropped on the way in, both
            // forwarded and to the router itself (dropped before conntrack confirms an entry,
            // so an early packet from a peer cannot claim the port a mapping needs).
            let rules = format!(
                "table ip nat {{\n  chain post {{\n    type nat hook postrouting priority 100;\n    oifname \"wan\" {masq}\n  }}\n}}\n\
                 table ip filter {{\n  chain forward_in {{\n    type filter hook forward priority 0; policy accept;\n    \
                 ct state invalid drop\n    iifname \"wan\" ct state new drop\n  }}\n  \
                 chain input {{\n    type filter hook input priority 0; policy accept;\n    \
                 iifname \"wan\" ct state new drop\n  }}\n}}\n"
            );
            let file = std::env::temp_dir().join(format!("{r}.nft"));
            std::fs::write(&file, rules).expect("nft rules file");
            run(&["ip", "netns", "exec", r, "nft", "-f", file.to_str().expect("utf-8 path")]);
        }
        t
    }

    fn all(&self) -> [&str; 5] {
        [&self.public, &self.router_a, &self.router_b, &self.a, &self.b]
    }

    /// `ip netns exec NS program args…`.
    pub fn exec(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// A TCP listener bound inside namespace `ns`.
    pub fn listen(&self, ns: &str, addr: SocketAddr) -> std::net::TcpListener {
        listen_in(ns, addr)
    }
}

/// A TCP listener (non-blocking) bound inside namespace `ns`.
pub fn listen_in(ns: &str, addr: SocketAddr) -> std::net::TcpListener {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd; only this short-lived thread changes namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        let l = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {path}: {e}"));
        l.set_nonblocking(true).expect("non-blocking");
        l
    })
    .join()
    .expect("namespace thread panicked")
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
