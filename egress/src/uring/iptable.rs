//! Interned peer addresses: per-IP accounting and XDP expiry matching without an address
//! stored in every connection.

use std::collections::HashMap;
use std::net::IpAddr;

/// Interned peer addresses (for per-IP accounting without storing an address per connection).
#[derive(Default)]
pub(super) struct IpTable {
    ids: HashMap<IpAddr, (u32, u32)>,
    addrs: Vec<Option<IpAddr>>,
    free: Vec<u32>,
}

impl IpTable {
    pub(super) fn intern(&mut self, ip: IpAddr) -> u32 {
        if let Some((id, refs)) = self.ids.get_mut(&ip) {
            *refs += 1;
            return *id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.addrs[id as usize] = Some(ip);
                id
            }
            None => {
                self.addrs.push(Some(ip));
                (self.addrs.len() - 1) as u32
            }
        };
        self.ids.insert(ip, (id, 1));
        id
    }

    /// The interned id of `ip`, if a connection from it is open.
    pub(super) fn id_of(&self, ip: IpAddr) -> Option<u32> {
        self.ids.get(&ip).map(|&(id, _)| id)
    }

    pub(super) fn release(&mut self, id: u32) -> Option<IpAddr> {
        let ip = self.addrs.get(id as usize).copied().flatten()?;
        let e = self.ids.get_mut(&ip)?;
        e.1 -= 1;
        if e.1 == 0 {
            self.ids.remove(&ip);
            self.addrs[id as usize] = None;
            self.free.push(id);
        }
        Some(ip)
    }
}
