//! Configuration of the signaling service: a TOML file (`deny_unknown_fields`), embedded
//! defaults that run with no file, CLI flags over both (in main.rs).

use crate::hub::HubConfig;
use crate::msg::IceServer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Listen,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// STUN/TURN servers handed to clients (`[[ice_servers]]` tables).
    pub ice_servers: Vec<IceServer>,
    pub store: Store,
    pub drain: Drain,
    pub admin: Admin,
    pub log: Log,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Where volunteers and consumers connect (`ws://ADDR/v1/signal`).
    pub addr: SocketAddr,
    pub backlog: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_clients: usize,
    pub max_clients_per_ip: u32,
    pub max_slots_per_volunteer: u32,
    pub max_sessions: usize,
    pub max_candidates_per_side: u32,
    /// Volunteers tried per consumer before it hears "unavailable".
    pub max_attempts: u32,
    /// Consumer requests per IP address: a burst, then this many per second.
    pub consumer_burst: u32,
    pub consumer_per_sec: u32,
    /// Messages queued towards one client before it is dropped as too slow.
    pub send_queue: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// The HTTP upgrade and the first message must arrive within this.
    #[serde(with = "humantime_serde")]
    pub hello: Duration,
    /// PING interval asked of clients.
    #[serde(with = "humantime_serde")]
    pub ping: Duration,
    /// A client silent this long is dropped.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// A volunteer must answer an offer within this.
    #[serde(with = "humantime_serde")]
    pub answer: Duration,
    /// A session lives at most this long.
    #[serde(with = "humantime_serde")]
    pub session: Duration,
    /// Told to consumers when no volunteer is free.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Store {
    /// `memory`: this process alone. `redis`: one of several replicas sharing waiting
    /// volunteers and pending matches in Redis at `url` (docs/SIGNALING.md §13).
    pub kind: String,
    /// `redis://HOST:PORT/DB` (`rediss://` for TLS is not built in).
    pub url: String,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub prefix: String,
    /// This replica's id (letters, digits, `-`, `_`); empty: a random one at start. Give
    /// each replica its own (e.g. the pod name).
    pub replica: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drain {
    /// After SIGTERM: sessions in progress get this long to finish.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// `/metrics`, `/live`, `/ready` (unset: none).
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for Listen {
    fn default() -> Self {
        Listen { addr: "0.0.0.0:8090".parse().expect("literal"), backlog: 1024 }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let h = HubConfig::default();
        Limits {
            max_clients: h.max_clients,
            max_clients_per_ip: h.max_clients_per_ip,
            max_slots_per_volunteer: h.max_slots_per_volunteer,
            max_sessions: h.max_sessions,
            max_candidates_per_side: h.max_candidates_per_side,
            max_attempts: h.max_attempts,
            consumer_burst: h.consumer_burst,
            consumer_per_sec: h.consumer_per_sec,
            send_queue: 64,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        let h = HubConfig::default();
        Timeouts {
            hello: Duration::from_millis(h.hello_timeout),
            ping: Duration::from_millis(h.ping_interval),
            idle: Duration::from_millis(h.idle_timeout),
            answer: Duration::from_millis(h.answer_timeout),
            session: Duration::from_millis(h.session_ttl),
            retry_after: Duration::from_millis(h.retry_after),
        }
    }
}

impl Default for Store {
    fn default() -> Self {
        Store {
            kind: "memory".into(),
            url: "redis://127.0.0.1:6379/".into(),
            prefix: "broflake:".into(),
            replica: String::new(),
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain { grace: Duration::from_secs(10) }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin { listen: Some("127.0.0.1:9091".parse().expect("literal")) }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log { filter: "info".into(), format: "text".into() }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("invalid configuration in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Cross-field rules; every message says what to change.
    pub fn validate(&self) -> Result<()> {
        let t = &self.timeouts;
        for (name, d) in
            [("hello", t.hello), ("ping", t.ping), ("idle", t.idle), ("answer", t.answer), ("session", t.session)]
        {
            if d.is_zero() {
                bail!("timeouts.{name} must be more than zero");
            }
        }
        if t.ping >= t.idle {
            bail!("timeouts.ping must be shorter than timeouts.idle (clients ping to stay connected)");
        }
        if t.answer >= t.session {
            bail!("timeouts.answer must be shorter than timeouts.session");
        }
        let l = &self.limits;
        if l.max_clients == 0 || l.max_clients_per_ip == 0 || l.max_sessions == 0 || l.send_queue == 0 {
            bail!("limits: max_clients, max_clients_per_ip, max_sessions and send_queue must be at least 1");
        }
        if l.max_attempts == 0 || l.max_slots_per_volunteer == 0 || l.consumer_burst == 0 || l.consumer_per_sec == 0 {
            bail!(
                "limits: max_attempts, max_slots_per_volunteer, consumer_burst and consumer_per_sec must be at least 1"
            );
        }
        match self.store.kind.as_str() {
            "memory" => {}
            "redis" => {
                if !self.store.url.starts_with("redis://") {
                    bail!("store.url must be a redis:// URL (got {:?})", self.store.url);
                }
                if !self.store.replica.is_empty() && !crate::shared::valid_replica_id(&self.store.replica) {
                    bail!(
                        "store.replica: letters, digits, '-' and '_' only, at most 64 (got {:?})",
                        self.store.replica
                    );
                }
                if self.store.prefix.contains(char::is_whitespace) {
                    bail!("store.prefix must not contain spaces");
                }
            }
            other => bail!("store.kind must be \"memory\" or \"redis\" (got {other:?})"),
        }
        for s in &self.ice_servers {
            if s.urls.is_empty() {
                bail!("ice_servers: every entry needs at least one URL");
            }
            for u in &s.urls {
                if !(u.starts_with("stun:") || u.starts_with("turn:") || u.starts_with("turns:")) {
                    bail!("ice_servers: {u:?} is not a stun:, turn: or turns: URL");
                }
                if u.starts_with("turns:") {
                    tracing::warn!(url = %u, "turns: URLs are handed out, but the native clients use UDP TURN only");
                }
                if u.starts_with("turn") && (s.username.is_empty() || s.credential.is_empty()) {
                    bail!("ice_servers: {u:?} needs a username and a credential");
                }
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format must be \"text\" or \"json\"");
        }
        Ok(())
    }

    /// The matchmaking core's settings.
    pub fn hub(&self) -> HubConfig {
        let (l, t) = (&self.limits, &self.timeouts);
        HubConfig {
            max_clients: l.max_clients,
            max_clients_per_ip: l.max_clients_per_ip,
            max_slots_per_volunteer: l.max_slots_per_volunteer,
            max_sessions: l.max_sessions,
            max_candidates_per_side: l.max_candidates_per_side,
            hello_timeout: ms(t.hello),
            ping_interval: ms(t.ping),
            idle_timeout: ms(t.idle),
            answer_timeout: ms(t.answer),
            session_ttl: ms(t.session),
            max_attempts: l.max_attempts,
            retry_after: ms(t.retry_after),
            consumer_burst: l.consumer_burst,
            consumer_per_sec: l.consumer_per_sec,
            ice_servers: self.ice_servers.clone(),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serialises")
    }
}
