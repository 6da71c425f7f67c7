//! The shared store on Redis (docs/SIGNALING.md §13): carries out a hub's [`StoreOp`]s and
//! brings other replicas' [`Relay`]s in.
//!
//! Keys (all under the configured prefix, `broflake:` by default):
//! - `alive:R` — replica R is up (set every second, expires after [`ALIVE_TTL`]);
//! - `vol:R.C` — hash {replica, free}: volunteer C at replica R and its free slots;
//! - `ready` — sorted set of volunteers with a free slot, ordered by when they were last
//!   picked (round robin over the fleet); `seq` is the order counter;
//! - `sess:SID` — hash {owner, vol, st}: a pending match, expiring with the session;
//! - channels `to:R` (relays for replica R) and `all` (for every replica).
//!
//! One task runs every operation in order on one connection (so an offer is never overtaken
//! by its own candidates). While Redis cannot be reached the replica reports not ready and
//! every request fails at once: consumers hear "unavailable", nothing waits on a timeout
//! per message. Reconnected, the replica announces its volunteers again (a restarted Redis
//! has forgotten them).

use crate::msg::SessionId;
use crate::shared::{FromVolunteer, Relay, RouteFailure, StoreOp, VolunteerRef};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, AsyncConnectionConfig, Script};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a replica counts as alive after its last heartbeat.
pub const ALIVE_TTL: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A Redis command that takes longer than this counts as Redis being unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the store tells the hub.
#[derive(Debug)]
pub enum StoreEvent {
    Picked {
        session: SessionId,
        volunteer: Option<VolunteerRef>,
    },
    RouteFailed {
        session: SessionId,
        client: u64,
        msg: FromVolunteer,
        why: RouteFailure,
    },
    Relay(Relay),
    Registered {
        client: u64,
    },
    /// The hub's volunteers and their free slots, to announce again after reconnecting.
    Resync {
        reply: oneshot::Sender<Vec<(u64, u32)>>,
    },
}

/// The store's settings.
#[derive(Debug, Clone)]
pub struct RedisStore {
    pub url: String,
    pub prefix: String,
    pub replica: String,
    pub max_slots: u32,
}

/// Takes a slot of a live volunteer not in the skip list, round robin. Entries of volunteers
/// that are gone, or whose replica stopped its heartbeat, are removed on the way.
const PICK: &str = r#"
local ready, seq, prefix = KEYS[1], KEYS[2], ARGV[1]
local skip = {}
for i = 2, #ARGV do skip[ARGV[i]] = true end
local start = 0
while true do
  local batch = redis.call('ZRANGE', ready, start, start + 63)
  if #batch == 0 then return false end
  local kept = 0
  for _, vid in ipairs(batch) do
    local vk = prefix .. 'vol:' .. vid
    local rep = redis.call('HGET', vk, 'replica')
    if not rep then
      redis.call('ZREM', ready, vid)
    elseif redis.call('EXISTS', prefix .. 'alive:' .. rep) == 0 then
      redis.call('DEL', vk)
      redis.call('ZREM', ready, vid)
    elseif skip[vid] then
      kept = kept + 1
    else
      local free = redis.call('HINCRBY', vk, 'free', -1)
      if free < 0 then
        redis.call('HSET', vk, 'free', 0)
        redis.call('ZREM', ready, vid)
      else
        if free == 0 then
          redis.call('ZREM', ready, vid)
        else
          redis.call('ZADD', ready, redis.call('INCR', seq), vid)
        end
        return vid
      end
    end
  end
  start = start + kept
end
"#;

/// A volunteer's announced free slots (absolute).
const SLOTS: &str = r#"
redis.call('HSET', KEYS[1], 'replica', ARGV[2], 'free', ARGV[3])
if tonumber(ARGV[3]) > 0 then
  redis.call('ZADD', KEYS[2], 'NX', redis.call('INCR', KEYS[3]), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
"#;

/// A slot back to a volunteer that still exists, at most its limit.
const GIVE_BACK: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local free = redis.call('HINCRBY', KEYS[1], 'free', 1)
if free > tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], 'free', ARGV[2]) end
redis.call('ZADD', KEYS[2], 'NX', redis.call('INCR', KEYS[3]), ARGV[1])
return 1
"#;

/// A volunteer's message to the owner of its session: -1 when the match record is not this
/// volunteer's (or gone), else the number of replicas that received it (0: owner gone).
const ROUTE: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or redis.call('HGET', KEYS[1], 'vol') ~= ARGV[1] then return -1 end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'st', 'answered') end
local n = redis.call('PUBLISH', ARGV[3] .. 'to:' .. owner, ARGV[2])
if n == 0 then redis.call('DEL', KEYS[1]) end
return n
"#;

/// Removes every volunteer of this replica from the store (before announcing those connected
/// now: entries left by a predecessor under the same id, or by volunteers that left while
/// Redis was unreachable, must not stay pickable). KEYS[1] the ready set; ARGV[1] the key
/// pattern, ARGV[2] the `vol:` key prefix.
const FORGET_REPLICA: &str = r#"
local cursor, n = "0", 0
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    redis.call('DEL', k)
    redis.call('ZREM', KEYS[1], string.sub(k, #ARGV[2] + 1))
    n = n + 1
  end
until cursor == "0"
return n
"#;

/// `s` with the glob characters of Redis's MATCH escaped.
fn glob_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut o, c| {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            o.push('\\');
        }
        o.push(c);
        o
    })
}

struct Scripts {
    forget_replica: Script,
    pick: Script,
    slots: Script,
    give_back: Script,
    route: Script,
}

impl RedisStore {
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Runs the store until `ops` closes: connects (and reconnects, with backoff), serves
    /// `ops`, and sends events to the hub. `ready` is true while Redis is reachable.
    pub async fn run(
        self,
        mut ops: mpsc::UnboundedReceiver<StoreOp>,
        events: mpsc::Sender<StoreEvent>,
        ready: Arc<AtomicBool>,
    ) {
        let scripts = Scripts {
            forget_replica: Script::new(FORGET_REPLICA),
            pick: Script::new(PICK),
            slots: Script::new(SLOTS),
            give_back: Script::new(GIVE_BACK),
            route: Script::new(ROUTE),
        };
        let mut backoff = Duration::from_millis(100);
        let mut logged_down = false;
        loop {
            match self.connect(&scripts, &events).await {
                Ok((mut con, mut pubsub)) => {
                    tracing::info!(url = %self.url, replica = %self.replica, "shared store connected");
                    logged_down = false;
                    backoff = Duration::from_millis(100);
                    ready.store(true, Ordering::Relaxed);
                    let why = self.serve(&mut con, &mut pubsub, &scripts, &mut ops, &events).await;
                    ready.store(false, Ordering::Relaxed);
                    match why {
                        None => return,
                        Some(e) => tracing::warn!(error = %e, "shared store lost; not ready until it is back"),
                    }
                }
                Err(e) => {
                    if !logged_down {
                        tracing::warn!(url = %self.url, error = %e, "shared store unreachable; not ready, retrying");
                        logged_down = true;
                    }
                }
            }
            // Down: fail what comes in at once while waiting to retry.
            let retry = tokio::time::sleep(backoff);
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    _ = &mut retry => break,
                    op = ops.recv() => match op {
                        Some(op) => fail(op, &self.replica, &events).await,
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Connects, subscribes, announces this replica and its volunteers.
    async fn connect(
        &self,
        scripts: &Scripts,
        events: &mpsc::Sender<StoreEvent>,
    ) -> redis::RedisResult<(MultiplexedConnection, redis::aio::PubSubStream)> {
        let client = redis::Client::open(self.url.as_str())?;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut con = client.get_multiplexed_async_connection_with_config(&cfg).await?;
        let mut pubsub = tokio::time::timeout(RESPONSE_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
        pubsub.subscribe(self.key(&format!("to:{}", self.replica))).await?;
        pubsub.subscribe(self.key("all")).await?;
        self.heartbeat(&mut con).await?;
        let vol_prefix = self.key("vol:");
        let stale: i64 = scripts
            .forget_replica
            .key(self.key("ready"))
            .arg(format!("{}{}.*", glob_escape(&vol_prefix), glob_escape(&self.replica)))
            .arg(&vol_prefix)
            .invoke_async(&mut con)
            .await?;
        if stale > 0 {
            tracing::info!(stale, "forgot this replica's volunteers left in the store; announcing those connected now");
        }
        // A restarted Redis has forgotten this replica's volunteers: announce them again.
        let (reply, rx) = oneshot::channel();
        if events.send(StoreEvent::Resync { reply }).await.is_ok() {
            if let Ok(vols) = rx.await {
                for (client, free) in vols {
                    self.slots(&scripts.slots, &mut con, client, free).await?;
                }
            }
        }
        Ok((con, pubsub.into_on_message()))
    }

    async fn heartbeat(&self, con: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let ms = u64::try_from(ALIVE_TTL.as_millis()).unwrap_or(3000);
        let _: () = redis::cmd("SET")
            .arg(self.key(&format!("alive:{}", self.replica)))
            .arg(1)
            .arg("PX")
            .arg(ms)
            .query_async(con)
            .await?;
        Ok(())
    }

    async fn slots(
        &self,
        s: &Script,
        con: &mut MultiplexedConnection,
        client: u64,
        free: u32,
    ) -> redis::RedisResult<()> {
        let v = VolunteerRef { replica: self.replica.clone(), client }.key();
        s.key(self.key(&format!("vol:{v}")))
            .key(self.key("ready"))
            .key(self.key("seq"))
            .arg(&v)
            .arg(&self.replica)
            .arg(free)
            .invoke_async::<()>(con)
            .await
    }

    /// Serves until Redis fails (its error) or the hub is gone (`None`).
    async fn serve(
        &self,
        con: &mut MultiplexedConnection,
        pubsub: &mut redis::aio::PubSubStream,
        s: &Scripts,
        ops: &mut mpsc::UnboundedReceiver<StoreOp>,
        events: &mpsc::Sender<StoreEvent>,
    ) -> Option<redis::RedisError> {
        let mut beat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                op = ops.recv() => {
                    let op = op?;
                    if let Err((op, e)) = self.apply(con, s, op, events).await {
                        fail(op, &self.replica, events).await;
                        return Some(e);
                    }
                }
                m = pubsub.next() => {
                    let Some(m) = m else {
                        return Some(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into());
                    };
                    match serde_json::from_slice::<Relay>(m.get_payload_bytes()) {
                        Ok(r) => {
                            if events.send(StoreEvent::Relay(r)).await.is_err() {
                                return None;
                            }
                        }
                        Err(e) => tracing::warn!(channel = m.get_channel_name(), error = %e, "unreadable relay message dropped"),
                    }
                }
                _ = beat.tick() => {
                    if let Err(e) = self.heartbeat(con).await {
                        return Some(e);
                    }
                }
            }
        }
    }

    /// One operation; on a Redis error the operation comes back to be failed.
    async fn apply(
        &self,
        con: &mut MultiplexedConnection,
        s: &Scripts,
        op: StoreOp,
        events: &mpsc::Sender<StoreEvent>,
    ) -> Result<(), (StoreOp, redis::RedisError)> {
        let r = match &op {
            StoreOp::Slots { client, free } => self.slots(&s.slots, con, *client, *free).await.map(|_| None),
            StoreOp::Registered { client } => Ok(Some(StoreEvent::Registered { client: *client })),
            StoreOp::VolunteerGone { client } => {
                let v = VolunteerRef { replica: self.replica.clone(), client: *client };
                let gone = serde_json::to_string(&Relay::VolunteerGone { volunteer: v.clone() }).expect("plain data");
                redis::pipe()
                    .del(self.key(&format!("vol:{}", v.key())))
                    .zrem(self.key("ready"), v.key())
                    .publish(self.key("all"), gone)
                    .query_async::<()>(con)
                    .await
                    .map(|_| None)
            }
            StoreOp::Pick { session, skip } => {
                let mut inv = s.pick.key(self.key("ready"));
                inv.key(self.key("seq")).arg(&self.prefix);
                for v in skip {
                    inv.arg(v.key());
                }
                inv.invoke_async::<Option<String>>(con).await.map(|v| {
                    let volunteer = v.and_then(|v| VolunteerRef::parse(&v));
                    Some(StoreEvent::Picked { session: *session, volunteer })
                })
            }
            StoreOp::GiveBack { volunteer } => {
                let v = volunteer.key();
                s.give_back
                    .key(self.key(&format!("vol:{v}")))
                    .key(self.key("ready"))
                    .key(self.key("seq"))
                    .arg(&v)
                    .arg(self.max_slots)
                    .invoke_async::<i64>(con)
                    .await
                    .map(|_| None)
            }
            StoreOp::Match { session, volunteer, ttl_ms } => redis::pipe()
                .hset_multiple(
                    self.key(&format!("sess:{session}")),
                    &[("owner", self.replica.as_str()), ("vol", volunteer.key().as_str()), ("st", "offered")],
                )
                .pexpire(self.key(&format!("sess:{session}")), i64::try_from(*ttl_ms).unwrap_or(i64::MAX))
                .query_async::<()>(con)
                .await
                .map(|_| None),
            StoreOp::EndMatch { session } => con.del::<_, ()>(self.key(&format!("sess:{session}"))).await.map(|_| None),
            StoreOp::ToVolunteer { volunteer, msg } => {
                let relay = Relay::ToVolunteer { client: volunteer.client, msg: msg.clone() };
                let json = serde_json::to_string(&relay).expect("plain data");
                con.publish::<_, _, i64>(self.key(&format!("to:{}", volunteer.replica)), json).await.map(|n| {
                    // Nobody listens: that replica is gone, and its volunteer with it.
                    (n == 0).then(|| StoreEvent::Relay(Relay::VolunteerGone { volunteer: volunteer.clone() }))
                })
            }
            StoreOp::FromVolunteer { session, client, msg } => {
                let volunteer = VolunteerRef { replica: self.replica.clone(), client: *client };
                let relay = Relay::FromVolunteer { session: *session, volunteer: volunteer.clone(), msg: msg.clone() };
                let answer = if matches!(msg, FromVolunteer::Answer { .. }) { "1" } else { "0" };
                s.route
                    .key(self.key(&format!("sess:{session}")))
                    .arg(volunteer.key())
                    .arg(serde_json::to_string(&relay).expect("plain data"))
                    .arg(&self.prefix)
                    .arg(answer)
                    .invoke_async::<i64>(con)
                    .await
                    .map(|n| {
                        let why = match n {
                            -1 => RouteFailure::UnknownSession,
                            0 => RouteFailure::OwnerGone,
                            _ => return None,
                        };
                        Some(StoreEvent::RouteFailed { session: *session, client: *client, msg: msg.clone(), why })
                    })
            }
        };
        match r {
            Ok(Some(ev)) => {
                let _ = events.send(ev).await;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err((op, e)),
        }
    }
}

/// What a request becomes when Redis cannot be reached.
async fn fail(op: StoreOp, replica: &str, events: &mpsc::Sender<StoreEvent>) {
    let ev = match op {
        StoreOp::Pick { session, .. } => StoreEvent::Picked { session, volunteer: None },
        StoreOp::Registered { client } => StoreEvent::Registered { client },
        StoreOp::FromVolunteer { session, client, msg } => {
            StoreEvent::RouteFailed { session, client, msg, why: RouteFailure::OwnerGone }
        }
        StoreOp::ToVolunteer { volunteer, .. } if volunteer.replica != replica => {
            StoreEvent::Relay(Relay::VolunteerGone { volunteer })
        }
        // Announcements are made again on reconnecting; match records expire.
        _ => return,
    };
    let _ = events.send(ev).await;
}
