//! Network interfaces: which ones are up and which addresses they hold (getifaddrs), and
//! which of them carry the egress's listen addresses (where the XDP program must attach
//! when `liveness.interfaces` is empty).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An interface that is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub loopback: bool,
    pub addrs: Vec<IpAddr>,
}

/// Every interface that is up, with its addresses, in name order.
pub fn up_interfaces() -> std::io::Result<Vec<Interface>> {
    let mut out: BTreeMap<String, Interface> = BTreeMap::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        let flags = ifa.ifa_flags;
        if flags & libc::IFF_UP as u32 == 0 || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        let entry = out.entry(name.clone()).or_insert_with(|| Interface {
            name,
            loopback: flags & libc::IFF_LOOPBACK as u32 != 0,
            addrs: Vec::new(),
        });
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family says which struct it is.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))))
                }
                libc::AF_INET6 => {
                    let a = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    Some(IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)))
                }
                _ => None,
            }
        };
        if let Some(a) = addr {
            entry.addrs.push(a);
        }
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out.into_values().collect())
}

/// The interfaces that carry traffic to `listen`, and why, for the log:
/// - a wildcard address (0.0.0.0, ::) is reachable through every interface: all that are up,
///   loopback included (a connection over loopback that no XDP program sees would never be
///   reaped, because user space keeps no idle deadline in xdp mode);
/// - a specific address: the interface that holds it.
///
/// Addresses no interface holds are reported in the reason.
pub fn carrying(listen: &[SocketAddr], interfaces: &[Interface]) -> (Vec<String>, String) {
    let mut chosen: Vec<String> = Vec::new();
    let mut why = Vec::new();
    let wildcards: Vec<String> = listen.iter().filter(|a| a.ip().is_unspecified()).map(|a| a.to_string()).collect();
    if !wildcards.is_empty() {
        let all: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        let (what, verb) =
            if wildcards.len() == 1 { ("address", "is a wildcard") } else { ("addresses", "are wildcards") };
        why.push(format!(
            "the listen {what} {} {verb}: every interface that is up ({})",
            wildcards.join(", "),
            all.join(", ")
        ));
        chosen.extend(all.iter().map(|s| s.to_string()));
    }
    for addr in listen.iter().filter(|a| !a.ip().is_unspecified()) {
        let ip = addr.ip().to_canonical();
        match interfaces.iter().find(|i| i.addrs.iter().any(|a| a.to_canonical() == ip)) {
            Some(i) => {
                why.push(format!("{addr} is on {}", i.name));
                chosen.push(i.name.clone());
            }
            None => why.push(format!("{addr} is on no interface that is up")),
        }
    }
    chosen.sort();
    chosen.dedup();
    (chosen, why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, loopback: bool, addrs: &[&str]) -> Interface {
        Interface { name: name.into(), loopback, addrs: addrs.iter().map(|a| a.parse().unwrap()).collect() }
    }

    #[test]
    fn wildcard_takes_every_interface_specific_takes_its_own() {
        let ifs = vec![
            iface("eth0", false, &["198.51.100.7", "2001:db8::7"]),
            iface("lo", true, &["127.0.0.1", "::1"]),
            iface("veth1", false, &["10.1.0.1"]),
        ];
        let (c, why) = carrying(&["0.0.0.0:8080".parse().unwrap()], &ifs);
        assert_eq!(c, vec!["eth0", "lo", "veth1"]);
        assert!(why.contains("wildcard"), "{why}");
        let (c, _) = carrying(&["[2001:db8::7]:8443".parse().unwrap(), "127.0.0.1:8080".parse().unwrap()], &ifs);
        assert_eq!(c, vec!["eth0", "lo"]);
        let (c, why) = carrying(&["203.0.113.1:80".parse().unwrap()], &ifs);
        assert!(c.is_empty());
        assert!(why.contains("no interface"), "{why}");
    }

    #[test]
    fn this_host_has_a_loopback_interface_that_is_up() {
        let ifs = up_interfaces().unwrap();
        assert!(ifs.iter().any(|i| i.loopback && i.addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST))), "{ifs:?}");
    }
}
