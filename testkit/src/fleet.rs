//! Egress hosts in network namespaces of their own on one segment, and a front namespace on
//! the same segment for what sits before them (a load balancer, relays, consumers, an origin):
//!
//! ```text
//!   front  10.88.0.1 (bridge br0) ─┬─ host 0  10.88.0.2
//!                                  ├─ host 1  10.88.0.3
//!                                  └─ …
//! ```
//!
//! Everything is removed when the value is dropped, also when a test fails.

use crate::nat::run;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

pub const FRONT: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);

/// The address of host `i`.
pub fn host(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, 0, 2 + u8::try_from(i).expect("a few hosts"))
}

/// Why the fleet tests cannot run here (root for namespaces, HAProxy), or `None`. Under CI
/// every piece is there, so there a missing one fails the test instead of skipping it.
pub fn unavailable() -> Option<String> {
    crate::nat::needs(&[("haproxy", "-v", "haproxy")])
}

#[derive(Debug)]
pub struct FleetNet {
    pub front: String,
    pub hosts: Vec<String>,
}

impl FleetNet {
    /// The front namespace and `n` host namespaces; `tag` keeps parallel tests apart.
    pub fn new(tag: &str, n: usize) -> FleetNet {
        let id = format!("{tag}{}", std::process::id() % 10_000);
        let net =
            FleetNet { front: format!("bf-front-{id}"), hosts: (0..n).map(|i| format!("bf-h{i}-{id}")).collect() };
        for ns in net.all() {
            crate::nat::fresh_namespace(ns);
        }
        let f = net.front.as_str();
        run(&["ip", "-n", f, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", f, "link", "set", "br0", "up"]);
        run(&["ip", "-n", f, "addr", "add", &format!("{FRONT}/24"), "dev", "br0"]);
        for (i, h) in net.hosts.iter().enumerate() {
            let port = format!("p{i}");
            run(&["ip", "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", f]);
            run(&["ip", "-n", f, "link", "set", &port, "master", "br0", "up"]);
            run(&["ip", "-n", h, "addr", "add", &format!("{}/24", host(i)), "dev", "eth0"]);
            run(&["ip", "-n", h, "link", "set", "eth0", "up"]);
        }
        net
    }

    fn all(&self) -> Vec<&str> {
        std::iter::once(self.front.as_str()).chain(self.hosts.iter().map(String::as_str)).collect()
    }

    /// `ip netns exec NS program args…`.
    pub fn exec(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// A TCP listener bound inside namespace `ns`.
    pub fn listen(&self, ns: &str, addr: SocketAddr) -> std::net::TcpListener {
        crate::nat::listen_in(ns, addr)
    }
}

impl Drop for FleetNet {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
