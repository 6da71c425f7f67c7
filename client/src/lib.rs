//! Native Broflake clients: the relay (a volunteer's "widget") and the consumer (the
//! censored user), as a library and the `broflake` CLI.
//!
//! - [`link`]: one WebSocket to an egress or upstream relay running the client side of the
//!   protocol (handshake, client-driven PING with jitter, dead-link detection, routes).
//! - [`consumer`]: a QUIC connection to the egress tunnelled over a link route, proxy
//!   streams on it, and failover to another link without losing the QUIC connection.

pub mod consumer;
pub mod link;
pub mod local_proxy;
pub mod middlebox;
pub mod pipe;
pub mod relay;
pub mod signaled;
pub mod transport;
pub mod volunteer;

pub use consumer::{Consumer, ProxyError};
pub use link::{Link, LinkConfig, LinkEvent, LinkSender, TlsMode};
