//! Backrouting by hop-by-hop label switching (PROTOCOL.md §12).
//!
//! A relay is a server to its downstream links (consumers or other relays) and a client
//! of one or more upstream connections. Each direction has its own label space; the table
//! maps `(downstream link, downstream label) ↔ (upstream connection, upstream label)` and
//! allocates upstream labels monotonically per upstream connection.

use std::collections::HashMap;
use std::hash::Hash;

/// Why a route could not be mapped upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteTableError {
    #[error("upstream connection carries its limit of {0} routes")]
    UpstreamFull(u64),
    #[error("upstream connection is not registered")]
    NoUpstream,
}

#[derive(Debug, Clone, Default)]
struct Upstream {
    next_label: u64,
    open: u64,
    max_routes: u64,
}

/// The route table of one relay. `D` names downstream links, `U` upstream connections.
#[derive(Debug, Clone)]
pub struct RouteTable<D, U> {
    down: HashMap<(D, u64), (U, u64)>,
    up: HashMap<(U, u64), (D, u64)>,
    upstreams: HashMap<U, Upstream>,
}

impl<D, U> Default for RouteTable<D, U> {
    fn default() -> Self {
        RouteTable { down: HashMap::new(), up: HashMap::new(), upstreams: HashMap::new() }
    }
}

impl<D: Copy + Eq + Hash, U: Copy + Eq + Hash> RouteTable<D, U> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an upstream connection once its WELCOME arrived.
    pub fn add_upstream(&mut self, up: U, max_routes: u64) {
        self.upstreams.entry(up).or_default().max_routes = max_routes;
    }

    /// Forgets an upstream connection; returns the downstream routes it carried.
    pub fn remove_upstream(&mut self, up: U) -> Vec<(D, u64)> {
        self.upstreams.remove(&up);
        let labels: Vec<(U, u64)> = self.up.keys().filter(|(u, _)| *u == up).copied().collect();
        let mut lost = Vec::with_capacity(labels.len());
        for key in labels {
            if let Some(d) = self.up.remove(&key) {
                self.down.remove(&d);
                lost.push(d);
            }
        }
        lost
    }

    /// Upstream connections with their open-route counts.
    pub fn upstream_load(&self) -> impl Iterator<Item = (U, u64)> + '_ {
        self.upstreams.iter().map(|(u, s)| (*u, s.open))
    }

    /// The upstream side of a downstream route, if mapped.
    pub fn upstream_of(&self, link: D, label: u64) -> Option<(U, u64)> {
        self.down.get(&(link, label)).copied()
    }

    /// The downstream side of an upstream route, if mapped.
    pub fn downstream_of(&self, up: U, label: u64) -> Option<(D, u64)> {
        self.up.get(&(up, label)).copied()
    }

    /// The upstream side of a downstream route, mapping it onto `up` if it is new.
    /// Returns `(upstream, label, new)`.
    pub fn route_up(&mut self, link: D, label: u64, up: U) -> Result<(U, u64, bool), RouteTableError> {
        if let Some(&(u, l)) = self.down.get(&(link, label)) {
            return Ok((u, l, false));
        }
        let state = self.upstreams.get_mut(&up).ok_or(RouteTableError::NoUpstream)?;
        if state.open >= state.max_routes {
            return Err(RouteTableError::UpstreamFull(state.max_routes));
        }
        let ul = state.next_label;
        state.next_label += 1;
        state.open += 1;
        self.down.insert((link, label), (up, ul));
        self.up.insert((up, ul), (link, label));
        Ok((up, ul, true))
    }

    /// Maps a downstream route onto an upstream label the caller allocated (on the upstream
    /// connection's client session). Fails if the upstream is full or unknown.
    pub fn insert(&mut self, link: D, label: u64, up: U, up_label: u64) -> Result<(), RouteTableError> {
        let state = self.upstreams.get_mut(&up).ok_or(RouteTableError::NoUpstream)?;
        if state.open >= state.max_routes {
            return Err(RouteTableError::UpstreamFull(state.max_routes));
        }
        state.open += 1;
        state.next_label = state.next_label.max(up_label + 1);
        if let Some(old) = self.down.insert((link, label), (up, up_label)) {
            self.up.remove(&old);
            if let Some(s) = self.upstreams.get_mut(&old.0) {
                s.open -= 1;
            }
        }
        self.up.insert((up, up_label), (link, label));
        Ok(())
    }

    /// Whether an upstream can take another route.
    pub fn has_room(&self, up: U) -> bool {
        self.upstreams.get(&up).is_some_and(|s| s.open < s.max_routes)
    }

    /// Open routes carried by an upstream.
    pub fn load(&self, up: U) -> u64 {
        self.upstreams.get(&up).map_or(0, |s| s.open)
    }

    /// The routes carried by an upstream: (downstream link, downstream label, upstream label).
    pub fn routes_of(&self, up: U) -> Vec<(D, u64, u64)> {
        self.up.iter().filter(|((u, _), _)| *u == up).map(|((_, ul), (d, dl))| (*d, *dl, *ul)).collect()
    }

    /// Releases a route known by its downstream side; returns its upstream side.
    pub fn close_down(&mut self, link: D, label: u64) -> Option<(U, u64)> {
        let (u, l) = self.down.remove(&(link, label))?;
        self.up.remove(&(u, l));
        if let Some(s) = self.upstreams.get_mut(&u) {
            s.open -= 1;
        }
        Some((u, l))
    }

    /// Releases a route known by its upstream side; returns its downstream side.
    pub fn close_up(&mut self, up: U, label: u64) -> Option<(D, u64)> {
        let d = self.up.remove(&(up, label))?;
        self.down.remove(&d);
        if let Some(s) = self.upstreams.get_mut(&up) {
            s.open -= 1;
        }
        Some(d)
    }

    /// A downstream link went away: releases its routes, returning their upstream sides
    /// (each gets a ROUTE_CLOSE upstream).
    pub fn remove_link(&mut self, link: D) -> Vec<(U, u64)> {
        let keys: Vec<(D, u64)> = self.down.keys().filter(|(d, _)| *d == link).copied().collect();
        keys.into_iter().filter_map(|(d, l)| self.close_down(d, l)).collect()
    }

    /// Moves every route of `from` onto `to` with fresh labels (GOAWAY migration).
    /// Returns `(old upstream label, new upstream label)` pairs.
    pub fn migrate(&mut self, from: U, to: U) -> Result<Vec<(u64, u64)>, RouteTableError> {
        let keys: Vec<(U, u64)> = self.up.keys().filter(|(u, _)| *u == from).copied().collect();
        let mut moved = Vec::with_capacity(keys.len());
        for (u, old) in keys {
            let (link, label) = self.close_up(u, old).expect("key listed above");
            match self.route_up(link, label, to) {
                Ok((_, new, _)) => moved.push((old, new)),
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Number of mapped routes.
    pub fn len(&self) -> usize {
        self.down.len()
    }

    pub fn is_empty(&self) -> bool {
        self.down.is_empty()
    }
}
