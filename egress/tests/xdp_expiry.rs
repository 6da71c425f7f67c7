//! Kernel-side idle expiry on real TCP traffic: two network namespaces made for this test
//! (client and server) joined by a veth pair, the XDP program on the server side's veth,
//! 1,000 connections that send a few bytes and go idle, and 1,000 that send a byte every
//! 500 ms. Every idle one must be reported within idle_timeout + one sweep; no busy one ever.
//!
//! Needs root (network namespaces, CAP_BPF) and the embedded object; without either it says
//! why and skips, except under CI (CI=true), where a missing object fails. Addresses live
//! only inside the namespaces; the host's interfaces are not touched.

use broflake_egress::xdp::{AttachMode, ExpiredFlow, Xdp, XdpConfig};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IDLE: usize = 1_000;
const BUSY: usize = 1_000;
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
const SWEEP: Duration = Duration::from_millis(250);
const BUSY_EVERY: Duration = Duration::from_millis(500);
const PORT: u16 = 8443;

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces and eBPF need CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_BPF".into());
    }
    if !broflake_egress::xdp::is_built() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the XDP object is not embedded; CI must build it first (cargo xtask build-ebpf)"
        );
        return Some("the XDP object is not embedded (run `cargo xtask build-ebpf`)".into());
    }
    None
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("cannot run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces joined by a veth pair; deleted on drop (also when the test fails).
struct Namespaces {
    server: String,
    client: String,
}

const SERVER_IF: &str = "bfx-srv";
const CLIENT_IF: &str = "bfx-cli";
const SERVER_IP: &str = "192.168.77.1";
const CLIENT_IP: &str = "192.168.77.2";

impl Namespaces {
    fn create() -> Namespaces {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let ns = Namespaces { server: format!("bfx-{id}-srv"), client: format!("bfx-{id}-cli") };
        ns.delete();
        ip(&["netns", "add", &ns.server]);
        ip(&["netns", "add", &ns.client]);
        // Created inside the server namespace, its peer moved straight into the client's.
        ip(&[
            "-n", &ns.server, "link", "add", SERVER_IF, "type", "veth", "peer", "name", CLIENT_IF, "netns", &ns.client,
        ]);
        ip(&["-n", &ns.server, "addr", "add", &format!("{SERVER_IP}/24"), "dev", SERVER_IF]);
        ip(&["-n", &ns.client, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", CLIENT_IF]);
        for (n, dev) in [(&ns.server, SERVER_IF), (&ns.client, CLIENT_IF)] {
            ip(&["-n", n, "link", "set", "lo", "up"]);
            ip(&["-n", n, "link", "set", dev, "up"]);
        }
        ns
    }

    fn delete(&self) {
        for n in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Runs `f` on a thread that joined namespace `name` (sockets it creates stay there).
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_expire_and_busy_flows_do_not() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let ns = Namespaces::create();

    // The program on the server side's veth; the listener in the server namespace.
    let (mut xdp, listener) = in_netns(&ns.server, || {
        let cfg = XdpConfig {
            ports: vec![PORT],
            idle_timeout: IDLE_TIMEOUT,
            sweep_interval: SWEEP,
            interfaces: vec![SERVER_IF.to_owned()],
            map_capacity: 4096,
        };
        let xdp = Xdp::load(&cfg).unwrap_or_else(|e| panic!("XDP load: {e}"));
        let listener = std::net::TcpListener::bind((SERVER_IP, PORT)).expect("bind");
        listener.set_nonblocking(true).unwrap();
        (xdp, listener)
    });
    eprintln!("attached: {:?}", xdp.attached());
    assert_eq!(xdp.attached().len(), 1);

    // A server that reads and discards, holding every connection open.
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });

    // The clients, from the client namespace.
    let clients = in_netns(&ns.client, || {
        (0..IDLE + BUSY)
            .map(|_| {
                let s = std::net::TcpStream::connect((SERVER_IP, PORT)).expect("connect");
                s.set_nodelay(true).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect::<Vec<_>>()
    });
    let mut clients: Vec<tokio::net::TcpStream> =
        clients.into_iter().map(|s| tokio::net::TcpStream::from_std(s).unwrap()).collect();
    let mut busy = clients.split_off(IDLE);
    let mut idle = clients;
    let local: SocketAddr = (SERVER_IP.parse::<std::net::IpAddr>().unwrap(), PORT).into();

    // Idle connections: a few bytes each, then silence.
    let mut sent_at: HashMap<SocketAddr, Instant> = HashMap::new();
    for s in &mut idle {
        s.write_all(b"hello").await.unwrap();
        sent_at.insert(s.local_addr().unwrap(), Instant::now());
    }
    let last_idle_send = Instant::now();
    let busy_peers: HashSet<SocketAddr> = busy.iter().map(|s| s.local_addr().unwrap()).collect();
    // Busy connections: a byte every 500 ms until told to stop.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let pinger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(BUSY_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => return busy,
            }
            for s in &mut busy {
                s.write_all(b".").await.unwrap();
            }
        }
    });

    // Collect reports until every idle flow was expired and then one more idle timeout, so
    // that a busy flow wrongly expired would show.
    let bound = IDLE_TIMEOUT + SWEEP;
    let observe_until = last_idle_send + bound + Duration::from_secs(1);
    let mut expired: HashMap<SocketAddr, (Duration, ExpiredFlow)> = HashMap::new();
    let mut wrongly_expired = Vec::new();
    loop {
        let left = observe_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(Some(flow)) = tokio::time::timeout(left, xdp.next_expired()).await else { continue };
        let now = Instant::now();
        assert_eq!(flow.local, local);
        if let Some(sent) = sent_at.get(&flow.peer) {
            assert!(expired.insert(flow.peer, (now - *sent, flow)).is_none(), "{flow:?} reported twice");
        } else {
            assert!(busy_peers.contains(&flow.peer), "{flow:?} is not one of ours");
            wrongly_expired.push(flow);
        }
    }
    let _ = stop_tx.send(true);
    let busy = pinger.await.unwrap();
    let counters = xdp.counters();

    let mut latencies: Vec<Duration> = expired.values().map(|(d, _)| *d).collect();
    latencies.sort();
    let idle_seen: Vec<Duration> = expired.values().map(|(_, f)| f.idle).collect();
    let pct = |p: usize| latencies.get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1))).copied();
    eprintln!(
        "idle connections reported expired: {} of {IDLE}; time from last payload to report: min {:?}, \
         median {:?}, p99 {:?}, max {:?} (bound idle_timeout + one sweep = {bound:?}); idle at sweep: max {:?}",
        expired.len(),
        latencies.first(),
        pct(50),
        pct(99),
        latencies.last(),
        idle_seen.iter().max()
    );
    eprintln!("busy connections (a byte every {BUSY_EVERY:?}) reported expired: {}", wrongly_expired.len());
    eprintln!("counters: {counters:?}");

    assert_eq!(expired.len(), IDLE, "every idle connection is reported");
    assert!(wrongly_expired.is_empty(), "no busy connection is reported: {wrongly_expired:?}");
    let max = *latencies.last().unwrap();
    let kernel_max = *idle_seen.iter().max().unwrap();
    // The kernel's own view (its clock at the sweep minus the flow's last-seen) is exact up
    // to the coarse clock's tick; the time this test observes adds its own wake-ups.
    assert!(max >= IDLE_TIMEOUT, "no report before the idle timeout ({max:?})");
    assert!(
        kernel_max <= bound + Duration::from_millis(10),
        "every flow expired within idle_timeout + one sweep ({kernel_max:?})"
    );
    assert!(
        max <= bound + Duration::from_millis(100),
        "every report received within idle_timeout + one sweep ({max:?})"
    );
    for f in busy_peers.iter().take(20) {
        assert!(xdp.flow(*f, local).is_some(), "busy flow {f} is tracked");
    }
    assert_eq!(xdp.flows(), BUSY as u64, "only the busy flows are left in the table");

    // Closing the busy connections (FIN) removes their flows.
    drop(busy);
    let deadline = Instant::now() + Duration::from_secs(3);
    while xdp.flows() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("after the busy clients closed: {} flows, counters {:?}", xdp.flows(), xdp.counters());
    assert_eq!(xdp.flows(), 0, "FIN removes the flows");

    server.abort();
    drop(idle);
    drop(xdp);
    drop(ns);
}

/// Native XDP is refused on a namespace's loopback; the tracking runs at TC ingress there
/// instead of in generic XDP (which would copy every TCP segment), and it works: a flow with
/// payload is recorded, and expires once idle. An unknown interface is reported by name.
#[test]
fn loopback_falls_back_to_tc_ingress_which_tracks_and_expires_flows() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let ns = Namespaces::create();
    let (lo, recorded, expired, missing) = in_netns(&ns.server, || {
        use std::io::{Read, Write};
        let cfg = |interfaces: Vec<String>| XdpConfig {
            ports: vec![PORT],
            idle_timeout: IDLE_TIMEOUT,
            sweep_interval: SWEEP,
            interfaces,
            map_capacity: 64,
        };
        let missing = Xdp::load(&cfg(vec!["bfx-nothing".into()])).err().map(|e| e.to_string());
        let xdp = Xdp::load(&cfg(vec!["lo".into()])).unwrap_or_else(|e| panic!("attach to lo: {e}"));
        let listener = std::net::TcpListener::bind(("127.0.0.1", PORT)).expect("listen on lo");
        let mut client = std::net::TcpStream::connect(("127.0.0.1", PORT)).expect("connect on lo");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"hello over lo").unwrap();
        let mut buf = [0u8; 13];
        server.read_exact(&mut buf).unwrap();
        let wait = |what: &dyn Fn() -> bool, limit: Duration| {
            let t = Instant::now();
            while !what() && t.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(20));
            }
            what()
        };
        let recorded = wait(&|| xdp.flows() == 1, Duration::from_secs(2));
        let expired = wait(&|| xdp.counters().flows_expired == 1, IDLE_TIMEOUT + SWEEP * 4);
        eprintln!("counters on lo: {:?}", xdp.counters());
        (xdp.attached().to_vec(), recorded, expired && xdp.flows() == 0, missing)
    });
    eprintln!("lo: {lo:?}; unknown interface: {missing:?}");
    assert_eq!(lo.len(), 1);
    assert_eq!(lo[0].mode, AttachMode::Tc, "driver mode is refused on lo, TC ingress is used");
    assert!(recorded, "the client's payload segment recorded its flow at TC ingress");
    assert!(expired, "the idle flow was expired by the sweep");
    assert_eq!(missing.as_deref(), Some("no network interface named bfx-nothing"));
    drop(ns);
}
