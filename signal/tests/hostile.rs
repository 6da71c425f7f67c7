//! The signaling service on real sockets under bad input: each case gets its documented
//! answer (error code, close code), the metric that counts it moves, and a well-behaved
//! volunteer and consumer are matched afterwards (docs/SIGNALING.md §6–§7).

use broflake_signal::client::{ConsumerRequest, SignalConn, Volunteer, VolunteerEvent};
use broflake_signal::config::Config;
use broflake_signal::server::Server;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const SDP: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n";

type Ws = WebSocketStream<TcpStream>;

async fn ws(addr: SocketAddr) -> Ws {
    let mut req = format!("ws://{addr}/v1/signal").into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("broflake-signal.v1"));
    let (ws, _) = tokio_tungstenite::client_async(req, TcpStream::connect(addr).await.unwrap()).await.unwrap();
    ws
}

/// Reads until the service closes: the `error` code it sent, if any, and the close code.
async fn outcome(ws: &mut Ws) -> (Option<String>, u16) {
    let mut code = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("the service answers") {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "error" {
                    code = v["code"].as_str().map(str::to_owned);
                }
            }
            Some(Ok(Message::Close(f))) => return (code, f.map_or(1005, |f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (code, 1006),
        }
    }
}

async fn server(tweak: impl FnOnce(&mut Config)) -> Server {
    let mut c = Config::default();
    c.listen.addr = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = None;
    tweak(&mut c);
    Server::start(c).await.unwrap()
}

/// A good volunteer and a good consumer still meet.
async fn still_serves(s: &Server) {
    let v = Volunteer::register(SignalConn::connect(&s.url(), None, Duration::from_secs(5)).await.unwrap(), 1)
        .await
        .expect("a good volunteer registers");
    let conn = SignalConn::connect(&s.url(), None, Duration::from_secs(5)).await.unwrap();
    let req = ConsumerRequest::start(conn, SDP, Duration::from_secs(5)).await.expect("a good consumer is matched");
    let mut events = v.events;
    let offer = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap();
    assert!(matches!(offer, Some(VolunteerEvent::Offer { session, .. }) if session == req.session), "{offer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_binary_messages_get_their_codes() {
    let s = server(|_| {}).await;
    let cases: Vec<(&str, Message, Option<&str>, u16)> = vec![
        ("not JSON", Message::text("{nope"), Some("bad_message"), 4400),
        ("no type", Message::text(r#"{"slots":1}"#), Some("bad_message"), 4400),
        ("binary", Message::binary(vec![1u8, 2, 3]), Some("bad_message"), 4400),
        ("wrong first message", Message::text(r#"{"type":"slots","free":1}"#), Some("unexpected"), 4409),
        (
            "unsupported version",
            Message::text(r#"{"type":"volunteer","versions":[9],"slots":1}"#),
            Some("unsupported_version"),
            4426,
        ),
        (
            "SDP bomb",
            Message::text(format!(r#"{{"type":"consumer","versions":[1],"offer":"v=0{}"}}"#, "a=x\\r\\n".repeat(4000))),
            Some("too_large"),
            1009,
        ),
    ];
    for (name, m, code, close) in cases {
        let mut c = ws(s.addr).await;
        c.send(m).await.unwrap();
        let (got, closed) = outcome(&mut c).await;
        assert_eq!(got.as_deref(), code, "{name}");
        assert_eq!(closed, close, "{name}");
    }
    // Over the 32 KiB message limit: the WebSocket layer stops reading the message and
    // closes with 1009 at once (an `error` message cannot follow a close).
    let mut c = ws(s.addr).await;
    c.send(Message::text(format!(r#"{{"type":"ping","pad":"{}"}}"#, "p".repeat(40_000)))).await.unwrap();
    let (_, closed) = outcome(&mut c).await;
    assert_eq!(closed, 1009, "over 32 KiB");
    still_serves(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_and_bad_upgrades_are_refused() {
    let s = server(|c| c.timeouts.hello = Duration::from_millis(500)).await;
    // Upgraded, then silent: error timeout, close 4408.
    let mut c = ws(s.addr).await;
    let (code, close) = outcome(&mut c).await;
    assert_eq!((code.as_deref(), close), (Some("timeout"), 4408));
    // No subprotocol: HTTP 400; wrong path: HTTP 404.
    for (path, proto, status) in [("/v1/signal", None, 400), ("/elsewhere", Some("broflake-signal.v1"), 404)] {
        let mut req = format!("ws://{}{path}", s.addr).into_client_request().unwrap();
        if let Some(p) = proto {
            req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(p));
        }
        match tokio_tungstenite::client_async(req, TcpStream::connect(s.addr).await.unwrap()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), status, "{path}"),
            other => panic!("{path}: expected HTTP {status}, got {other:?}"),
        }
    }
    // A TCP connection that never sends its upgrade is closed at the hello timeout.
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut raw, &mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "closed: {n:?}");
    still_serves(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_fake_volunteers_and_consumer_requests_are_bounded() {
    let s = server(|c| {
        c.limits.max_clients_per_ip = 16;
        c.limits.consumer_burst = 5;
        c.limits.consumer_per_sec = 1;
    })
    .await;
    // 40 fake volunteers from one address: 16 are served, the rest cut off before the upgrade.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let mut req = format!("ws://{}/v1/signal", s.addr).into_client_request().unwrap();
        req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("broflake-signal.v1"));
        match tokio_tungstenite::client_async(req, TcpStream::connect(s.addr).await.unwrap()).await {
            Ok((mut w, _)) => {
                w.send(Message::text(r#"{"type":"volunteer","versions":[1],"slots":0}"#)).await.unwrap();
                held.push(w);
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (16, 24));
    assert_eq!(s.snapshot().await.clients, 16);
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Consumer requests: a burst of 5, then rate_limited (4429).
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let mut c = ws(s.addr).await;
        c.send(Message::text(format!(r#"{{"type":"consumer","versions":[1],"offer":{}}}"#, serde_json::json!(SDP))))
            .await
            .unwrap();
        outcomes.push(outcome(&mut c).await);
    }
    let limited = outcomes.iter().filter(|o| o.0.as_deref() == Some("rate_limited") && o.1 == 4429).count();
    let unavailable = outcomes.iter().filter(|o| o.0.is_none() && o.1 == 1000).count();
    assert_eq!((unavailable, limited), (5, 3), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volunteer_that_does_not_read_is_dropped_not_buffered() {
    let s = server(|c| {
        c.limits.send_queue = 4;
        c.limits.consumer_burst = 1000;
        c.limits.max_clients_per_ip = 2000;
        c.limits.max_slots_per_volunteer = 1000;
    })
    .await;
    // A volunteer with a small receive buffer that stops reading after registering.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(s.addr).await.unwrap();
    let mut req = format!("ws://{}/v1/signal", s.addr).into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("broflake-signal.v1"));
    let (mut slow, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    slow.send(Message::text(r#"{"type":"volunteer","versions":[1],"slots":1000}"#)).await.unwrap();
    let _hello = slow.next().await;
    let _registered = slow.next().await;
    // Up to 600 consumers, each with a 15 KiB offer: far more than the kernel's socket
    // buffers and the 4-message queue hold for a volunteer that does not read.
    let offer = format!("v=0\r\n{}", "a=x-filler\r\n".repeat(1200));
    let mut consumers = Vec::new();
    for _ in 0..600 {
        let conn = SignalConn::connect(&s.url(), None, Duration::from_secs(5)).await.unwrap();
        match ConsumerRequest::start(conn, &offer, Duration::from_secs(5)).await {
            Ok(r) => consumers.push(r),
            Err(e) => {
                eprintln!("consumer: {e}");
                break;
            }
        }
        if s.snapshot().await.volunteers == 0 {
            break;
        }
    }
    let t = std::time::Instant::now();
    while s.snapshot().await.volunteers != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the slow volunteer is still registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Reading now, the volunteer finds the close the service sent when it gave up on it
    // (4413), or the connection already gone.
    let mut close = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
        match m {
            Ok(Message::Close(f)) => close = f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => break,
        }
        break;
    }
    assert!(matches!(close, Some(4413) | None), "{close:?}");
    drop(consumers);
    still_serves(&s).await;
}
