//! The Broflake signaling service: volunteers (browser tabs, native relays) hold a WebSocket
//! to it and announce free consumer slots; a consumer asks for a volunteer with its SDP
//! offer; the service matches them, passes the answer and ICE candidates both ways, then
//! forgets them. The wire protocol is docs/SIGNALING.md.
//!
//! - [`msg`]: the messages and their bounds (no I/O);
//! - [`hub`]: matchmaking, sessions, limits and timeouts, sans-IO (time is passed in);
//! - [`shared`]: what replicas share through a store (Redis) and pass each other;
//! - `server`, `client`, `config` (feature `runtime`): the tokio server with its admin
//!   listener, WebSocket clients for both roles, and the TOML configuration.

pub mod hub;
pub mod metrics;
pub mod msg;
pub mod shared;

#[cfg(feature = "runtime")]
pub mod client;
#[cfg(feature = "runtime")]
pub mod config;
#[cfg(feature = "runtime")]
pub mod redis_store;
#[cfg(feature = "runtime")]
pub mod server;
