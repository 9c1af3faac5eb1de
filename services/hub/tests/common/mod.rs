//! A real hub on a loopback port and real WebSocket clients for the integration tests.
#![allow(dead_code)]

pub mod process;
pub mod redis_cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, Payload};
use http_body_util::{BodyExt, Empty};
use hub::Settings;
use hub::token::{TokenRequest, mint, sign};
use hub_client::{ConnectError, Connected, DialOptions, Dialer, HubSocket, Received};
use hub_protocol::{Claims, Role, ServerFrame};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "integration-test-secret-of-32-bytes!";
pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestHub {
    pub addr: SocketAddr,
    pub settings: Settings,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TestHub {
    pub async fn start() -> TestHub {
        TestHub::with(|_| {}).await
    }

    /// Starts a hub on an ephemeral loopback port with test defaults changed by `configure`.
    pub async fn with(configure: impl FnOnce(&mut Settings)) -> TestHub {
        let mut settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            node_id: Some("test-hub".into()),
            ..Settings::default()
        };
        settings.auth.hs256_secret = Some(SECRET.into());
        configure(&mut settings);
        settings.validate().expect("test settings are valid");
        let server = hub::Server::bind(settings.clone())
            .await
            .expect("hub binds");
        let addr = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(server.run(async move { signal.cancelled().await }));
        TestHub {
            addr,
            settings,
            stop,
            task,
        }
    }

    pub fn token(&self, sub: &str, role: Role) -> String {
        mint(&self.settings.auth, &TokenRequest::new(sub, role)).unwrap()
    }

    pub fn token_for(&self, request: TokenRequest) -> String {
        mint(&self.settings.auth, &request).unwrap()
    }

    /// Signs arbitrary claims with the hub's key.
    pub fn sign(&self, claims: &Claims) -> String {
        sign(&self.settings.auth, claims).unwrap()
    }

    pub async fn connect(&self, token: &str) -> Client {
        match self.try_connect(token).await {
            Ok(client) => client,
            Err(refused) => panic!("connection refused: {refused:?}"),
        }
    }

    pub async fn try_connect(&self, token: &str) -> Result<Client, Refused> {
        connect(self.addr, &format!("/ws?token={token}"), None).await
    }

    /// A viewer subscribed to `channels`, `subscribed` frames consumed.
    pub async fn viewer(&self, name: &str, channels: &[&str]) -> Client {
        let mut client = self.connect(&self.token(name, Role::Viewer)).await;
        for channel in channels {
            client.subscribe(channel, None).await;
        }
        client
    }

    /// An agent with its `hello` consumed.
    pub async fn agent(&self, device: &str, groups: &[&str]) -> Client {
        let mut request = TokenRequest::new(device, Role::Agent);
        request.groups = groups.iter().map(|g| g.to_string()).collect();
        self.connect(&self.token_for(request)).await
    }

    /// Starts the drain as SIGTERM would and waits for the hub to stop.
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("hub drains")
            .unwrap();
    }

    /// GET over plain HTTP: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }

    /// The value of one sample line of `/metrics`, e.g. `hub_deliveries_total`.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no series {series}"))
            .parse()
            .unwrap()
    }
}

impl TestHub {
    /// Waits until `series` reads `value` (for counters updated when a connection has ended).
    pub async fn wait_for_metric(&self, series: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(series).await;
            if now == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {now}, expected {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// GET over plain HTTP: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "hub")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Any request over plain HTTP, with a bearer token and a body: status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "hub");
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req
        .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A refused upgrade: HTTP status and the JSON body (status 0: the transport failed).
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
}

impl From<ConnectError> for Refused {
    fn from(e: ConnectError) -> Refused {
        match e {
            ConnectError::Refused { status, body } => Refused {
                status,
                body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
            },
            other => Refused {
                status: 0,
                body: Value::String(other.to_string()),
            },
        }
    }
}

/// Opens a WebSocket to `path` with an optional `Authorization` header.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> Result<Client, Refused> {
    connect_with(addr, path, authorization, None).await
}

/// As [`connect`], with the client's socket receive buffer set to `recv_buffer` bytes: a client
/// that stops reading then stalls the hub's writes after a few kilobytes.
pub async fn connect_with(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
    recv_buffer: Option<u32>,
) -> Result<Client, Refused> {
    let options = DialOptions {
        recv_buffer,
        ..DialOptions::default()
    };
    let Connected { socket, node } = Dialer::plain(addr, options)
        .upgrade(path, authorization)
        .await?;
    let mut client = Client {
        ws: socket,
        hello: Value::Null,
        node,
    };
    client.hello = client.expect("hello").await;
    Ok(client)
}

/// What a client saw next.
#[derive(Debug)]
pub enum Event {
    Frame(Value),
    Closed(u16),
    /// The connection ended without a close frame, or nothing came in time.
    Gone,
    Timeout,
}

pub struct Client {
    pub ws: HubSocket,
    pub hello: Value,
    pub node: Option<String>,
}

impl Client {
    pub async fn send(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Sends a text frame. A failed write is not reported here: the next read sees the end.
    pub async fn send_text(&mut self, text: &str) {
        let _ = self
            .ws
            .write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
            .await;
    }

    /// Sends text frames in one write, so they reach the hub together (as an agent's window of
    /// publishes does when it is behind).
    pub async fn send_together(self, texts: &[String]) -> Client {
        let frames = texts
            .iter()
            .map(|t| Frame::text(Payload::Borrowed(t.as_bytes())))
            .collect();
        self.send_frames_together(frames).await
    }

    /// Sends frames in one write.
    pub async fn send_frames_together(self, frames: Vec<Frame<'_>>) -> Client {
        use tokio::io::AsyncWriteExt;
        let mut bytes = Vec::new();
        let mut scratch = Vec::new();
        for mut frame in frames {
            frame.mask();
            bytes.extend_from_slice(frame.write(&mut scratch));
        }
        // Nothing is buffered for reading after `hello`: the stream can be taken out and put back.
        let mut stream = self.ws.into_inner();
        stream.write_all(&bytes).await.unwrap();
        Client {
            ws: fastwebsockets::WebSocket::after_handshake(stream, fastwebsockets::Role::Client),
            ..self
        }
    }

    pub async fn send_frame(&mut self, frame: Frame<'_>) {
        self.ws.write_frame(frame).await.unwrap();
    }

    /// The next frame or close, within `WAIT`. Every text frame must be a valid protocol frame.
    pub async fn next(&mut self) -> Event {
        self.next_within(WAIT).await
    }

    pub async fn next_within(&mut self, wait: Duration) -> Event {
        match tokio::time::timeout(wait, hub_client::receive(&mut self.ws)).await {
            Err(_) => Event::Timeout,
            Ok(Err(_)) => Event::Gone,
            Ok(Ok(Received::Text(text))) => {
                ServerFrame::parse(&text).expect("hub sends protocol frames");
                Event::Frame(serde_json::from_slice(&text).unwrap())
            }
            Ok(Ok(Received::Closed(code))) => Event::Closed(code),
        }
    }

    /// The next frame, which must have `type`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        match self.next().await {
            Event::Frame(v) if v["type"] == kind => v,
            other => panic!("expected a `{kind}` frame, got {other:?}"),
        }
    }

    /// Reads until the hub closes; returns the close code (messages in between are skipped).
    pub async fn expect_close(&mut self) -> u16 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Event::Frame(_) => continue,
                Event::Closed(code) => return code,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str, since: Option<(&str, u64)>) -> Value {
        let mut frame = json!({"type": "subscribe", "channel": channel});
        if let Some((epoch, offset)) = since {
            frame["since"] = json!({"epoch": epoch, "offset": offset});
        }
        self.send(frame).await;
        // A partitioned channel answers once per partition (tests/partitions.rs reads replays
        // among them); the first answer stands for all.
        let first = self.expect("subscribed").await;
        for _ in 1..first["parts"].as_u64().unwrap_or(1) {
            self.expect("subscribed").await;
        }
        first
    }

    /// Publishes and returns the reply (`ack` or `error`).
    pub async fn publish(&mut self, seq: u64, data: Value) -> Value {
        self.send(json!({"type": "publish", "seq": seq, "data": data}))
            .await;
        match self.next().await {
            Event::Frame(v) => v,
            other => panic!("expected a reply to publish {seq}, got {other:?}"),
        }
    }

    /// Reads `n` `message` frames.
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(self.expect("message").await);
        }
        out
    }
}

/// Offsets of `message` frames.
pub fn offsets(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

/// A private `redis-server` on a unix socket in its own temp dir, killed on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub dir: tempfile::TempDir,
    persistent: bool,
}

impl RedisServer {
    /// No persistence: a restart loses everything.
    pub fn start() -> RedisServer {
        RedisServer::with(false)
    }

    /// Append-only file with fsync on every write: a restart keeps everything.
    pub fn start_persistent() -> RedisServer {
        RedisServer::with(true)
    }

    fn with(persistent: bool) -> RedisServer {
        let mut server = RedisServer::unstarted(persistent);
        server.spawn();
        server
    }

    /// A server whose socket path is known but which is not running yet.
    pub fn unstarted(persistent: bool) -> RedisServer {
        RedisServer {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            persistent,
        }
    }

    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.sock")
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    pub fn spawn(&mut self) {
        let dir = self.dir.path();
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args(["--unixsocketperm", "700", "--dir"])
            .arg(dir)
            .args([
                "--save",
                "",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
            ])
            .arg(dir.join("redis.log"))
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to save anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl TestHub {
    /// A hub on the Redis broker at `redis`, with quick repair intervals for tests.
    pub async fn on_redis(redis: &RedisServer) -> TestHub {
        TestHub::on_redis_with(redis, |_| {}).await
    }

    pub async fn on_redis_with(
        redis: &RedisServer,
        configure: impl FnOnce(&mut Settings),
    ) -> TestHub {
        let url = redis.url();
        TestHub::on_shared_redis(|s| {
            s.broker.url = Some(url);
            configure(s);
        })
        .await
    }

    /// A hub of a pool, ready: quick repair intervals and no publish rate limit in the way,
    /// then `configure` (which names the Redis).
    pub async fn on_shared_redis(configure: impl FnOnce(&mut Settings)) -> TestHub {
        let hub = TestHub::with(|s| {
            s.broker.position_check = Duration::from_millis(200);
            s.broker.timeout = Duration::from_secs(1);
            s.limits.publish_rate = 100_000.0;
            configure(s);
        })
        .await;
        hub.wait_ready(true).await;
        hub
    }

    /// Waits until `/readyz` says `ready`.
    pub async fn wait_ready(&self, ready: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (status, _) = self.get("/readyz").await;
            if (status == 200) == ready {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "readyz never became {ready}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What a viewer that reconnects and resumes on its own saw of one channel.
#[derive(Debug, Default)]
pub struct Followed {
    pub messages: Vec<Value>,
    /// `hello.hub` of every connection it made.
    pub hubs: Vec<String>,
    /// Close codes that ended its connections (1006 for a connection lost without one).
    pub closes: Vec<u16>,
    /// Times a resume was answered `recovered: false`: a hole the client was told about.
    pub holes: usize,
}

/// Follows `channel` through `addr` as client `client` until `done` says so (or 60 s pass),
/// reconnecting with jitter and resuming with `since` after every close, as a dashboard does:
/// one position per partition when the hub splits the channel.
pub async fn follow(
    addr: SocketAddr,
    token: &str,
    client: &str,
    channel: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Followed {
    let path = format!("/ws?client={client}&token={token}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Followed::default();
    // Partition (0 for a one-log channel) → last (epoch, offset); and how many partitions.
    let mut positions: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    let mut parts = 1;
    while !done(&seen.messages) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{client} stalled: {seen:?}"
        );
        let Ok(mut c) = connect(addr, &path, None).await else {
            tokio::time::sleep(Duration::from_millis(50 + rand::random::<u64>() % 100)).await;
            continue;
        };
        seen.hubs
            .push(c.hello["hub"].as_str().unwrap_or_default().to_owned());
        let mut subscribe = json!({"type": "subscribe", "channel": channel});
        // A partition not seen yet (a subscribe cut off half-way) is asked for as new.
        let since: Vec<Value> = (0..parts)
            .filter_map(|part| match positions.get(&part) {
                Some((epoch, offset)) => Some(json!({"epoch": epoch, "offset": offset})),
                None if positions.is_empty() => None,
                None => Some(json!({"epoch": "", "offset": 0})),
            })
            .collect();
        let resuming = !since.is_empty();
        if parts == 1 && since.len() == 1 {
            subscribe["since"] = since[0].clone();
        } else if resuming {
            subscribe["since"] = json!({ "partitions": since });
        }
        c.send(subscribe).await;
        loop {
            if done(&seen.messages) {
                return seen;
            }
            match c.next_within(Duration::from_millis(200)).await {
                Event::Frame(f) if f["type"] == "subscribed" => {
                    if resuming && f["recovered"] == false {
                        seen.holes += 1;
                    }
                    parts = f["parts"].as_u64().unwrap_or(1);
                    let epoch = f["epoch"].as_str().unwrap().to_owned();
                    let part = f["part"].as_u64().unwrap_or(0);
                    positions.insert(part, (epoch, f["offset"].as_u64().unwrap()));
                }
                Event::Frame(f) if f["type"] == "message" => {
                    let part = f["part"].as_u64().unwrap_or(0);
                    let epoch = f["epoch"].as_str().unwrap().to_owned();
                    positions.insert(part, (epoch, f["offset"].as_u64().unwrap()));
                    seen.messages.push(f);
                }
                Event::Frame(other) => panic!("{client} got {other}"),
                Event::Timeout => continue,
                Event::Closed(code) => {
                    seen.closes.push(code);
                    break;
                }
                Event::Gone => {
                    seen.closes.push(1006);
                    break;
                }
            }
        }
    }
    seen
}

/// What an agent that reconnects and resends saw.
#[derive(Debug, Default)]
pub struct Published {
    pub hubs: Vec<String>,
    /// Publishes answered `unavailable` and sent again.
    pub retried: usize,
}

/// Publishes readings `1..=count` of device `client` through `addr`, one at a time, resending
/// whatever was not acknowledged after a reconnect or an `unavailable` error.
pub async fn publish_all(
    addr: SocketAddr,
    token: &str,
    client: &str,
    count: u64,
    pace: Duration,
) -> Published {
    let path = format!("/ws?client={client}&token={token}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut report = Published::default();
    let mut next = 1;
    while next <= count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{client} stalled at {next}"
        );
        let Ok(mut c) = connect(addr, &path, None).await else {
            tokio::time::sleep(Duration::from_millis(50 + rand::random::<u64>() % 100)).await;
            continue;
        };
        report
            .hubs
            .push(c.hello["hub"].as_str().unwrap_or_default().to_owned());
        while next <= count {
            c.send(json!({"type": "publish", "seq": next, "data": {"seq": next}}))
                .await;
            match c.next().await {
                Event::Frame(f) if f["type"] == "ack" => {
                    next += 1;
                    tokio::time::sleep(pace).await;
                }
                Event::Frame(f) if f["code"] == "unavailable" => {
                    report.retried += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Event::Frame(other) => panic!("{client} got {other}"),
                _ => break,
            }
        }
    }
    report
}

/// A device silent for longer than `history.meta_ttl` (set short by the caller) is forgotten on
/// every channel at once: its next seq 1 is new on its device channel, the fleet and its groups
/// alike, while another device keeps `fleet` and the group busy meanwhile.
pub async fn a_device_silent_past_meta_ttl_starts_over_on_every_channel(hub: &TestHub) {
    let channels = ["devices.pi-a", "fleet", "groups.north"];
    let mut viewer = hub.viewer("v", &channels).await;
    let mut agent = hub.agent("pi-a", &["north"]).await;
    for seq in 1..=5 {
        assert_eq!(agent.publish(seq, json!({"n": seq})).await["type"], "ack");
    }
    drop(agent);
    let mut busy = hub.agent("pi-b", &["north"]).await;
    let silent_until = tokio::time::Instant::now() + 2 * hub.settings.history.meta_ttl;
    let mut seq = busy.hello["last_seq"].as_u64().unwrap();
    while tokio::time::Instant::now() < silent_until {
        seq += 1;
        assert_eq!(busy.publish(seq, json!({"busy": seq})).await["type"], "ack");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut agent = hub.agent("pi-a", &["north"]).await;
    assert_eq!(agent.hello["last_seq"], 0, "forgotten");
    assert_eq!(
        agent.publish(1, json!({"again": 1})).await,
        json!({"type": "ack", "seq": 1}),
        "new, not a duplicate"
    );
    let mut missing: BTreeSet<&str> = channels.into_iter().collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match viewer.next_within(left).await {
            Event::Frame(f) if f["type"] == "message" && f["data"] == json!({"again": 1}) => {
                assert!(missing.remove(f["channel"].as_str().unwrap()), "twice: {f}");
            }
            Event::Frame(_) => {}
            other => panic!("the reading never reached {missing:?}: {other:?}"),
        }
    }
}

/// Publishes an agent sends together go to the broker as one publication, however many they are,
/// and are answered in order: each is judged against what the device published before and
/// against the readings before it in the batch.
pub async fn publishes_sent_together_are_stored_as_one_and_answered_in_order(hub: &TestHub) {
    let channels = ["devices.pi-b", "fleet"];
    let mut viewer = hub.viewer("v", &channels).await;
    let mut agent = hub.agent("pi-b", &[]).await;
    assert_eq!(agent.publish(3, json!({"n": 3})).await["type"], "ack");
    let publications = hub.metric("hub_publish_batch_readings_count").await;

    // 1 and 2 are below 3, which the hub has; 20 comes twice.
    let seqs: Vec<u64> = (1..=40).chain([20, 41]).collect();
    let frames: Vec<String> = seqs
        .iter()
        .map(|seq| json!({"type": "publish", "seq": seq, "data": {"n": seq}}).to_string())
        .collect();
    let mut agent = agent.send_together(&frames).await;
    let mut last = 3;
    for seq in &seqs {
        let duplicate = *seq <= last;
        last = last.max(*seq);
        let expected = if duplicate {
            json!({"type": "ack", "seq": seq, "duplicate": true})
        } else {
            json!({"type": "ack", "seq": seq})
        };
        assert_eq!(agent.expect("ack").await, expected);
    }
    let stored_in = hub.metric("hub_publish_batch_readings_count").await - publications;
    assert!(
        stored_in <= 8.0,
        "{} publishes sent together took {stored_in} broker publications",
        seqs.len()
    );

    let mut seen: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for m in viewer.messages(2 + 2 * 38).await {
        if m["data"]["n"] == 3 {
            continue;
        }
        let channel = m["channel"].as_str().unwrap().to_owned();
        seen.entry(channel)
            .or_default()
            .push(m["data"]["n"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (4..=41).collect();
    for channel in channels {
        assert_eq!(
            seen.get(channel),
            Some(&expected),
            "{channel}: each once, in order"
        );
    }
}

/// The hub answers pings itself: one that came last with a batch of publishes does not make it
/// wait for a frame that will not come (the agent waits for the acks).
pub async fn a_ping_behind_a_batch_does_not_hold_its_acks(hub: &TestHub) {
    let agent = hub.agent("pi-c", &[]).await;
    let publish = |seq: u64| json!({"type": "publish", "seq": seq, "data": {}}).to_string();
    let (one, two) = (publish(1), publish(2));
    let frames = vec![
        Frame::text(Payload::Borrowed(one.as_bytes())),
        Frame::text(Payload::Borrowed(two.as_bytes())),
        Frame::new(
            true,
            fastwebsockets::OpCode::Ping,
            None,
            Payload::Borrowed(b"hi"),
        ),
    ];
    let mut agent = agent.send_frames_together(frames).await;
    assert_eq!(agent.expect("ack").await["seq"], 1);
    assert_eq!(agent.expect("ack").await["seq"], 2);
}

/// A 64 KiB outbound queue (16 KiB messages): a replay of 32 KiB or more never fits.
pub fn small_queue(s: &mut Settings) {
    s.limits.max_message_bytes = 16 * 1024;
    s.limits.outbound_queue_bytes = 64 * 1024;
    s.limits.publish_rate = 100_000.0;
}

/// On a hub with [`small_queue`]: a resume whose replay is over half the queue is answered
/// `recovered: false` (and live messages follow), one that fits is replayed.
pub async fn a_resume_whose_replay_would_not_fit_the_queue_is_answered_not_recovered(
    hub: &TestHub,
) {
    let mut agent = hub.agent("pi-1", &[]).await;
    let pad = "x".repeat(1000);
    let mut viewer = hub.viewer("v", &[]).await;
    let epoch = viewer.subscribe("fleet", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    for seq in 1..=100 {
        agent.publish(seq, json!({"n": seq, "pad": pad})).await;
    }
    viewer.messages(100).await;
    let mut late = hub.viewer("late", &[]).await;
    let far = late.subscribe("fleet", Some((&epoch, 0))).await;
    assert_eq!(
        (far["recovered"].as_bool(), far["offset"].as_u64()),
        (Some(false), Some(100))
    );
    let mut near = hub.viewer("near", &[]).await;
    let close = near.subscribe("fleet", Some((&epoch, 95))).await;
    assert_eq!(close["recovered"], true);
    assert_eq!(offsets(&near.messages(5).await), [96, 97, 98, 99, 100]);
    agent.publish(101, json!({"n": 101})).await;
    assert_eq!(
        offsets(&late.messages(1).await),
        [101],
        "live after the hole"
    );
}

/// Claims with just the required fields.
pub fn claims(sub: &str, role: &str, exp: u64) -> Claims {
    Claims {
        sub: sub.into(),
        role: role.into(),
        exp,
        iat: None,
        nbf: None,
        jti: None,
        iss: None,
        aud: None,
        groups: None,
        channels: None,
    }
}

/// `claims` signed with an HMAC `secret` of our choosing (not necessarily the hub's).
pub fn sign_with(claims: &Claims, alg: jsonwebtoken::Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}
