//! Destination policy: which addresses the egress may dial on a consumer's behalf.
//!
//! Checked on every resolved address right before it is dialled (the dial uses exactly the
//! checked address, so DNS cannot swap it afterwards). Refused by default: loopback,
//! private (RFC 1918, ULA), link-local, CGNAT, multicast, broadcast, unspecified,
//! documentation/benchmark ranges and cloud metadata endpoints — in IPv4, IPv6 and
//! IPv4-mapped/-compatible IPv6 forms.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is refused (shown to the consumer and counted in metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    Loopback,
    Private,
    LinkLocal,
    Cgnat,
    Multicast,
    Broadcast,
    Unspecified,
    Metadata,
    Reserved,
}

impl Forbidden {
    pub fn describe(self) -> &'static str {
        match self {
            Forbidden::Loopback => "a loopback address",
            Forbidden::Private => "a private address",
            Forbidden::LinkLocal => "a link-local address",
            Forbidden::Cgnat => "a carrier-grade NAT address",
            Forbidden::Multicast => "a multicast address",
            Forbidden::Broadcast => "a broadcast address",
            Forbidden::Unspecified => "an unspecified address",
            Forbidden::Metadata => "a cloud metadata address",
            Forbidden::Reserved => "a reserved address",
        }
    }
}

/// The policy: refuse internal destinations unless allowlisted.
#[derive(Debug, Clone)]
pub struct Policy {
    deny_internal: bool,
    allow: Vec<IpNet>,
}

impl Policy {
    pub fn new(deny_internal: bool, allow: Vec<IpNet>) -> Self {
        Policy { deny_internal, allow }
    }

    /// `Err` with the reason when `ip` must not be dialled.
    pub fn check(&self, ip: IpAddr) -> Result<(), Forbidden> {
        if !self.deny_internal || self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        classify(ip).map_or(Ok(()), Err)
    }
}

/// The forbidden class of an address, if any.
pub fn classify(ip: IpAddr) -> Option<Forbidden> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            // IPv4-mapped (::ffff:a.b.c.d) and the deprecated IPv4-compatible (::a.b.c.d) forms
            // reach the IPv4 address on dual-stack hosts: judge them as IPv4. So does NAT64's
            // well-known prefix 64:ff9b::/96.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0, 0, 0, 0, 0, 0] && !(s[6] == 0 && s[7] <= 1) {
                return classify_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return classify_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
            }
            classify_v6(v6)
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Forbidden> {
    let o = ip.octets();
    Some(match o {
        [169, 254, 169, 254] | [169, 254, 170, 2] | [100, 100, 100, 200] => Forbidden::Metadata,
        [127, ..] => Forbidden::Loopback,
        [10, ..] | [192, 168, ..] => Forbidden::Private,
        [172, b, ..] if (16..=31).contains(&b) => Forbidden::Private,
        [169, 254, ..] => Forbidden::LinkLocal,
        [100, b, ..] if (64..=127).contains(&b) => Forbidden::Cgnat,
        [224..=239, ..] => Forbidden::Multicast,
        [255, 255, 255, 255] => Forbidden::Broadcast,
        [0, ..] => Forbidden::Unspecified,
        // Protocol assignments, documentation, benchmarking, reserved-for-future-use.
        [192, 0, 0, _] | [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] | [240..=255, ..] => Forbidden::Reserved,
        [198, b, ..] if b == 18 || b == 19 => Forbidden::Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<Forbidden> {
    let s = ip.segments();
    Some(match s {
        _ if ip == Ipv6Addr::LOCALHOST => Forbidden::Loopback,
        _ if ip.is_unspecified() => Forbidden::Unspecified,
        [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] => Forbidden::Metadata,
        [a, ..] if a & 0xfe00 == 0xfc00 => Forbidden::Private,
        [a, ..] if a & 0xffc0 == 0xfe80 => Forbidden::LinkLocal,
        [a, ..] if a & 0xffc0 == 0xfec0 => Forbidden::Private, // deprecated site-local
        [a, ..] if a & 0xff00 == 0xff00 => Forbidden::Multicast,
        [0x2001, 0x0db8, ..] => Forbidden::Reserved,  // documentation
        [0x0100, 0, 0, 0, ..] => Forbidden::Reserved, // discard-only
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(p: &Policy, s: &str) -> Result<(), Forbidden> {
        p.check(s.parse().unwrap())
    }

    #[test]
    fn internal_destinations_are_refused_in_every_form() {
        let p = Policy::new(true, vec![]);
        let cases = [
            ("127.0.0.1", Forbidden::Loopback),
            ("127.255.0.9", Forbidden::Loopback),
            ("::1", Forbidden::Loopback),
            ("::ffff:127.0.0.1", Forbidden::Loopback),
            ("::127.0.0.1", Forbidden::Loopback),
            ("10.1.2.3", Forbidden::Private),
            ("172.16.0.1", Forbidden::Private),
            ("172.31.255.255", Forbidden::Private),
            ("192.168.1.1", Forbidden::Private),
            ("::ffff:192.168.1.1", Forbidden::Private),
            ("fd12:3456::1", Forbidden::Private),
            ("169.254.1.1", Forbidden::LinkLocal),
            ("fe80::1", Forbidden::LinkLocal),
            ("100.64.0.1", Forbidden::Cgnat),
            ("100.127.255.254", Forbidden::Cgnat),
            ("224.0.0.1", Forbidden::Multicast),
            ("ff02::1", Forbidden::Multicast),
            ("255.255.255.255", Forbidden::Broadcast),
            ("0.0.0.0", Forbidden::Unspecified),
            ("::", Forbidden::Unspecified),
            ("169.254.169.254", Forbidden::Metadata),
            ("::ffff:169.254.169.254", Forbidden::Metadata),
            ("fd00:ec2::254", Forbidden::Metadata),
            ("64:ff9b::a9fe:a9fe", Forbidden::Metadata),
            ("64:ff9b::7f00:1", Forbidden::Loopback),
        ];
        for (ip, why) in cases {
            assert_eq!(verdict(&p, ip), Err(why), "{ip}");
        }
        for ok in ["1.1.1.1", "93.184.216.34", "172.32.0.1", "100.63.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(verdict(&p, ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn allowlist_and_switch() {
        let p = Policy::new(true, vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(verdict(&p, "127.0.0.1"), Ok(()));
        assert_eq!(verdict(&p, "10.0.0.1"), Err(Forbidden::Private));
        let p = Policy::new(false, vec![]);
        assert_eq!(verdict(&p, "10.0.0.1"), Ok(()));
    }
}
