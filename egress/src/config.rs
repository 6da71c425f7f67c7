//! Configuration: a TOML file (`deny_unknown_fields`), embedded defaults that run with no
//! file at all, and CLI flags that override both.

use anyhow::{bail, Context, Result};
use broflake_proto::server::{ServerConfig, ServerPing};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Listen,
    pub tls: Tls,
    pub io: Io,
    pub liveness: Liveness,
    pub limits: Limits,
    pub quic: Quic,
    pub proxy: Proxy,
    pub drain: Drain,
    pub admin: Admin,
    pub log: Log,
    pub memory: Memory,
    pub fleet: Fleet,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Plain `ws://` listeners.
    pub ws: Vec<SocketAddr>,
    /// `wss://` listeners (TLS with the certificate from `[tls]`).
    pub wss: Vec<SocketAddr>,
    /// Request path of the WebSocket endpoint.
    pub path: String,
    /// TCP accept backlog.
    pub backlog: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain; with `key`. Unset: a self-signed one kept in `state_dir`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Where generated state (the self-signed certificate) lives. Default: `$STATE_DIRECTORY`
    /// (set by systemd) or `./egress-state`.
    pub state_dir: Option<PathBuf>,
    /// Names put in a generated certificate.
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Tokio,
    Uring,
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Io {
    pub backend: Backend,
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// io_uring: what an idle connection keeps armed (`poll`: a multishot poll, ≈256 B of
    /// kernel memory; `recv`: a multishot receive into the provided buffer ring, ≈860 B).
    pub uring_read: ReadMode,
    /// io_uring: connections live in each ring's registered file table (accepted there, every
    /// operation on the table's index) instead of the process's descriptor table. Falls back
    /// to ordinary descriptors, logged, where the kernel refuses the table. Off by default: a
    /// PING then costs a receive and a send on the ring instead of two system calls, ≈1.7× the
    /// CPU at a few thousand PINGs per second (docs/BENCHMARKS.md); for hosts whose open-file
    /// limit is below the connections they hold.
    pub uring_direct_descriptors: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LivenessMode {
    /// Coarse deadline sweep in user space (clients PING).
    Userspace,
    /// The server pings every connection (the original design; benchmark baseline).
    ServerPing,
    /// Kernel-side idle tracking with XDP.
    Xdp,
    /// XDP where it can load, else userspace.
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Liveness {
    pub mode: LivenessMode,
    /// PING interval announced to clients (and the server's ping interval in server-ping mode).
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// A connection that sent nothing for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Upgrade + HELLO must complete within this.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Granularity of the user-space deadline sweep.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Interfaces the XDP program attaches to (xdp mode).
    pub interfaces: Vec<String>,
    /// In userspace/xdp modes, ping clients that do not announce PING (compatibility). Off:
    /// liveness is purely client-driven and such clients are closed when idle.
    pub ping_clients_without_ping: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: u32,
    /// Largest Broflake frame accepted (announced in WELCOME). It also bounds the QUIC packets
    /// the egress sends (path MTU discovery probes up to what one DATA frame carries).
    pub max_frame_size: u32,
    /// Largest WebSocket message accepted.
    pub max_message_size: u32,
    pub max_routes_per_connection: u32,
    pub max_streams_per_quic_connection: u32,
    /// PING token bucket per connection.
    pub ping_burst: u32,
    pub ping_refill_per_sec: u32,
    /// A peer that does not take our bytes for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Outgoing QUIC packets queued per connection before new ones are dropped.
    pub send_queue_packets: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quic {
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Inbound packets buffered between the connections and the QUIC endpoint.
    pub inbound_queue: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Proxy {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub resolve_timeout: Duration,
    /// Refuse loopback, private, link-local, CGNAT, multicast and metadata destinations.
    pub deny_internal: bool,
    /// Networks allowed even when `deny_internal` would refuse them (tests, special deployments).
    pub allow: Vec<ipnet::IpNet>,
}

/// Several egress hosts behind one name (ARCHITECTURE.md "Past one host"): each issues QUIC
/// connection ids that carry its `id`, and forwards packets of another host's connections to
/// that host over UDP on the fleet's own network.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Fleet {
    /// This host's id in the fleet, 1–65535; 0: no fleet (connection ids are random).
    pub id: u16,
    /// The UDP address forwarded packets arrive at; on a network only the fleet reaches.
    pub listen: Option<SocketAddr>,
    /// Every other host: `[[fleet.peers]]` with `id` and `addr` (its `fleet.listen`).
    pub peers: Vec<FleetPeer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPeer {
    pub id: u16,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drain {
    /// Time between GOAWAY and closing the remaining connections.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Where clients should reconnect (GOAWAY hint; empty: the same URL).
    pub reconnect: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Listener for the status page (`/`), `/metrics`, `/live`, `/ready`. Default
    /// 127.0.0.1:9090; `listen = "off"` in TOML (or `--admin off`) disables it.
    #[serde(with = "admin_listen")]
    pub listen: Option<SocketAddr>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin { listen: Some("127.0.0.1:9090".parse().expect("literal")) }
    }
}

/// `admin.listen`: an address, or "off".
mod admin_listen {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::SocketAddr;

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s == "off" {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| serde::de::Error::custom(format!("{s:?} is not an address or \"off\"")))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// tracing filter, e.g. `info` or `broflake_egress=debug`.
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Memory {
    /// Transparent huge pages for the egress's own memory. `off` (default): 4 KiB pages, so
    /// idle connections cost what they hold (≈130 B each instead of ≈440 B with the kernel's
    /// `madvise` mode, where the allocator's arenas become 2 MiB pages). `system`: whatever
    /// /sys/kernel/mm/transparent_hugepage/enabled says.
    pub transparent_huge_pages: HugePages,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePages {
    #[default]
    Off,
    System,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            ws: vec!["0.0.0.0:8080".parse().expect("literal")],
            wss: vec!["0.0.0.0:8443".parse().expect("literal")],
            path: broflake_proto::binding::DEFAULT_PATH.into(),
            backlog: 4096,
        }
    }
}

impl Default for Io {
    fn default() -> Self {
        Io { backend: Backend::Auto, threads: 0, uring_read: ReadMode::Poll, uring_direct_descriptors: false }
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            mode: LivenessMode::Auto,
            keepalive: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(1),
            interfaces: Vec::new(),
            ping_clients_without_ping: true,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1_000_000,
            max_connections_per_ip: 256,
            max_frame_size: 16_384,
            max_message_size: 65_536,
            max_routes_per_connection: 256,
            max_streams_per_quic_connection: 256,
            ping_burst: 16,
            ping_refill_per_sec: 2,
            write_timeout: Duration::from_secs(30),
            send_queue_packets: 256,
        }
    }
}

impl Config {
    fn validate_fleet(&self) -> Result<()> {
        let f = &self.fleet;
        if f.id == 0 {
            if f.listen.is_some() || !f.peers.is_empty() {
                bail!("fleet: set fleet.id (1-65535) to use fleet.listen and fleet.peers");
            }
            return Ok(());
        }
        if f.listen.is_none() {
            bail!("fleet: fleet.listen (a UDP address on the fleet's network) is needed with fleet.id");
        }
        let mut seen = std::collections::HashSet::from([f.id]);
        for p in &f.peers {
            if p.id == 0 {
                bail!("fleet.peers: id 0 is not a host (ids are 1-65535)");
            }
            if !seen.insert(p.id) {
                bail!("fleet.peers: id {} appears twice (or is this host's own id)", p.id);
            }
        }
        Ok(())
    }
}

impl Default for Quic {
    fn default() -> Self {
        Quic { idle_timeout: Duration::from_secs(120), inbound_queue: 8192 }
    }
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            connect_timeout: Duration::from_secs(10),
            resolve_timeout: Duration::from_secs(5),
            deny_internal: true,
            allow: Vec::new(),
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain { grace: Duration::from_secs(30), reconnect: String::new() }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log { filter: "info".into(), format: "text".into() }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("invalid configuration in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks cross-field rules; every message says what to change.
    pub fn validate(&self) -> Result<()> {
        self.validate_fleet()?;
        if self.listen.ws.is_empty() && self.listen.wss.is_empty() {
            bail!("listen: configure at least one ws or wss address");
        }
        if !self.listen.path.starts_with('/') {
            bail!("listen.path must start with '/'");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            bail!("tls: set both cert and key, or neither (for a generated self-signed certificate)");
        }
        if self.limits.max_message_size < self.limits.max_frame_size {
            bail!("limits.max_message_size must be at least limits.max_frame_size");
        }
        if self.liveness.sweep_interval.is_zero() || self.liveness.sweep_interval > self.liveness.keepalive {
            bail!("liveness.sweep_interval must be non-zero and at most liveness.keepalive");
        }
        if self.limits.max_connections == 0 || self.limits.max_connections_per_ip == 0 {
            bail!("limits: connection limits must be at least 1");
        }
        if self.limits.send_queue_packets == 0 || self.quic.inbound_queue == 0 {
            bail!("queues must hold at least one packet");
        }
        if self.drain.reconnect.len() > broflake_proto::frame::MAX_RECONNECT_LEN {
            bail!("drain.reconnect must be at most 256 bytes");
        }
        if !(self.drain.reconnect.is_empty()
            || self.drain.reconnect.starts_with("ws://")
            || self.drain.reconnect.starts_with("wss://"))
        {
            bail!("drain.reconnect must be empty or a ws:// or wss:// URL");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format must be \"text\" or \"json\"");
        }
        self.session_config().validate().map_err(|e| anyhow::anyhow!("liveness/limits: {e}"))?;
        Ok(())
    }

    /// The protocol session settings this configuration implies.
    pub fn session_config(&self) -> ServerConfig {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        ServerConfig {
            keepalive_ms: ms(self.liveness.keepalive),
            idle_timeout_ms: ms(self.liveness.idle_timeout),
            handshake_timeout_ms: ms(self.liveness.handshake_timeout),
            max_frame_size: u64::from(self.limits.max_frame_size),
            max_routes: u64::from(self.limits.max_routes_per_connection),
            server_ping: if self.liveness.mode == LivenessMode::ServerPing {
                ServerPing::All
            } else if self.liveness.ping_clients_without_ping {
                ServerPing::Compat
            } else {
                ServerPing::Never
            },
            ping_burst: self.limits.ping_burst,
            ping_refill_per_sec: self.limits.ping_refill_per_sec,
            ..ServerConfig::default()
        }
    }

    /// The state directory for generated files.
    pub fn state_dir(&self) -> PathBuf {
        self.tls
            .state_dir
            .clone()
            .or_else(|| std::env::var_os("STATE_DIRECTORY").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("egress-state"))
    }

    /// The whole configuration as TOML (what `egress print-config` shows).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected_with_a_reason() {
        let e = Config::parse("[listen]\nwss_typo = []\n").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field `wss_typo`"), "{e:#}");
        let e = Config::parse("[liveness]\nkeepalive = \"40s\"\nidle_timeout = \"60s\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("twice the keepalive"), "{e:#}");
        let e = Config::parse("[tls]\ncert = \"a.pem\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("set both cert and key"), "{e:#}");
        let e = Config::parse("[liveness]\nmode = \"sometimes\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("unknown variant"), "{e:#}");
    }

    #[test]
    fn server_ping_mode_pings_everyone() {
        let c = Config::parse("[liveness]\nmode = \"server-ping\"\n").unwrap();
        assert_eq!(c.session_config().server_ping, ServerPing::All);
    }
}

/// How an idle io_uring connection waits for bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadMode {
    /// A multishot poll is armed; bytes are read with recv(2) into the thread's buffer.
    /// ≈256 B of kernel memory per idle socket.
    Poll,
    /// A multishot receive into the thread's provided buffer ring. ≈860 B per idle socket.
    Recv,
}
