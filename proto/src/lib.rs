//! Sans-IO implementation of the Broflake protocol layer between WebSocket and QUIC.
//!
//! `docs/PROTOCOL.md` is the normative specification; this crate is its reference
//! implementation. Nothing here performs I/O or reads a clock: callers pass received bytes
//! and the current [`time::Timestamp`] in, and take frames to send and deadlines out
//! (the model is quinn-proto). The server, the relay and consumer clients, the benchmark
//! load generator and the fuzz targets all share this one implementation.

pub mod binding;
pub mod client;
pub mod close;
pub mod codes;
pub mod fleet;
pub mod frame;
pub mod grease;
pub mod handshake;
mod labels;
pub mod packet_size;
pub mod proxy;
pub mod relay;
pub mod server;
pub mod time;
pub mod varint;

pub use client::{ClientConfig, ClientEvent, ClientSession, Negotiated};
pub use close::Close;
pub use codes::ErrorCode;
pub use frame::{decode, Capabilities, DecodeError, Decoded, Frame, Frames, Role, SessionId};
pub use packet_size::DataRefused;
pub use server::{ServerConfig, ServerEvent, ServerPing, ServerSession};
pub use time::Timestamp;
