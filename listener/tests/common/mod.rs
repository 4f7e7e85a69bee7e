//! A small world for end-to-end tests: mock-ews and mock-creatio in-process, the real
//! `exchange-listener` binary as a child process, and helpers that poll with a deadline.

#![allow(dead_code)]

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mock_creatio::MockCreatio;
use mock_ews::{Config, MockEws};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a condition may take before a test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `probe` every 20 ms until it yields a value, or fails the test after `patience`.
pub async fn eventually<T>(
    what: &str,
    patience: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {patience:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real listener binary, on a free loopback port, its output captured.
pub struct Listener {
    child: Child,
    pub base: String,
    pub http: reqwest::Client,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Listener {
    /// Spawns the binary with fast test timings; `extra` adds flags or overrides a default.
    pub async fn spawn(extra: &[&str]) -> Listener {
        Listener::spawn_with_env(extra, &[]).await
    }

    /// As [`Listener::spawn`], with environment variables set (or overridden: `NO_PROXY` is
    /// `127.0.0.1,localhost` unless given).
    pub async fn spawn_with_env(extra: &[&str], env: &[(&str, &str)]) -> Listener {
        let defaults = [
            ("--listen", "127.0.0.1:0"),
            ("--log", "info,exchange_listener=debug"),
            ("--retry-base-ms", "100"),
            ("--retry-max-ms", "1000"),
            ("--stream-idle-secs", "5"),
            ("--delivery-retry-base-ms", "50"),
            ("--delivery-retry-max-ms", "200"),
        ];
        let mut args: Vec<&str> = defaults
            .iter()
            .filter(|(flag, _)| !extra.contains(flag))
            .flat_map(|(flag, value)| [*flag, *value])
            .collect();
        args.extend_from_slice(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_exchange-listener"))
            .args(&args)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn exchange-listener");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let base = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                logs.lock().unwrap().push(line.clone());
                if let Some(rest) = line.split("listening on ").nth(1) {
                    return rest.split_whitespace().next().unwrap().to_owned();
                }
            }
            panic!(
                "exchange-listener exited before listening: {:?}",
                logs.lock().unwrap()
            );
        })
        .await
        .expect("exchange-listener did not start listening");
        // Keep draining output so the child never blocks on a full pipe.
        let sink = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Listener {
            child,
            base,
            http: reqwest::Client::new(),
            logs,
        }
    }

    /// POSTs a Creatio call with `body` written as Creatio writes it (names unquoted);
    /// answers the status and the body (JSON, or a string).
    pub async fn send(&self, action: &str, body: &Value) -> (u16, Value) {
        self.call(action, mock_creatio::calling::unquoted(body))
            .await
    }

    /// POSTs a Creatio call with this body as it is; answers the status and the body (JSON,
    /// or a string).
    pub async fn call(&self, action: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        self.post(&format!("/api/listeners/{action}"), body).await
    }

    /// POSTs this body as it is to `path`; answers the status and the body (JSON, or a
    /// string).
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json; charset=utf-8")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// GETs `path` and answers its JSON body (null when it is not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.get_text(path).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// GETs `path` and answers its body as text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    pub async fn state_of(&self, id: &str) -> String {
        let (status, body) = self.send("subscriptionsstate", &json!([id])).await;
        assert_eq!(status, 200, "{body}");
        body[id]["State"].as_str().unwrap_or("").to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("listener still running")
    }

    /// Kills the process outright (SIGKILL): no shutdown, no unsubscribe, leases left to lapse.
    pub async fn kill9(&mut self) {
        self.child.kill().await.expect("kill the listener");
    }

    /// Asks the process to stop (SIGTERM), as Kubernetes does.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    pub async fn wait(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("listener did not exit")
            .unwrap()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

pub struct World {
    pub ews: MockEws,
    pub creatio: MockCreatio,
}

impl World {
    /// Mocks on loopback; streams are cut every two seconds so reconnects happen in every test.
    pub async fn start() -> World {
        World::start_with(Config {
            keepalive: Duration::from_secs(1),
            max_connection_time: Some(Duration::from_secs(2)),
        })
        .await
    }

    pub async fn start_with(config: Config) -> World {
        World {
            ews: MockEws::start("127.0.0.1:0".parse().unwrap(), config)
                .await
                .unwrap(),
            creatio: MockCreatio::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        }
    }

    /// A credentials object as Creatio sends it.
    pub fn credentials(&self, id: &str, email: &str, password: &str, operation: &str) -> Value {
        mock_creatio::calling::credentials(
            id,
            email,
            Some(password),
            &self.ews.ews_url(),
            &self.creatio.url(operation),
        )
    }

    /// Creates the mailbox in mock-ews and in the listener, and waits until it streams.
    pub async fn subscribe(&self, listener: &Listener, id: &str, email: &str, operation: &str) {
        self.ews.create_mailbox(email, "secret").unwrap();
        self.create(listener, id, email, operation).await;
    }

    /// Creates the mailbox (already in mock-ews) in the listener and waits until it streams.
    pub async fn create(&self, listener: &Listener, id: &str, email: &str, operation: &str) {
        let streams_before = self.ews.stats().open_streams;
        let (status, body) = listener
            .send(
                "create",
                &json!([self.credentials(id, email, "secret", operation)]),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        eventually("the mailbox to stream", PATIENCE, async || {
            (self.ews.stats().open_streams > streams_before).then_some(())
        })
        .await;
    }
}

/// Requests mock-ews answered 401: with NTLM, two for each connection authenticated (the
/// first request, then the challenge).
pub fn challenges(world: &World) -> usize {
    world
        .ews
        .request_log()
        .iter()
        .filter(|r| r.status == 401)
        .count()
}

/// Every email that reached Creatio through ProcessFullEmail, in order: through any mailbox,
/// or through the one whose id is given.
pub fn posted_emails(world: &World, mailbox: Option<&str>) -> Vec<Value> {
    world
        .creatio
        .calls_of("ProcessFullEmail")
        .into_iter()
        .filter(|c| mailbox.is_none_or(|m| c.body["SubscriptionInfo"]["MailboxId"] == m))
        .flat_map(|c| c.body["Emails"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The Message-IDs of every email that reached Creatio through ProcessFullEmail, in order.
pub fn delivered(world: &World) -> Vec<String> {
    message_ids(&posted_emails(world, None))
}

/// The Message-IDs of these emails.
pub fn message_ids(emails: &[Value]) -> Vec<String> {
    emails
        .iter()
        .filter_map(|e| e["MessageId"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until every one of `sent` reached Creatio, then sends one more mail to `mailbox` and
/// waits for it too (a duplicate would have arrived before it), and checks each arrived once.
pub async fn assert_each_delivered_once(world: &World, mailbox: &str, sent: &[String]) {
    eventually("every mail at Creatio", PATIENCE, async || {
        let got = delivered(world);
        sent.iter().all(|m| got.contains(m)).then_some(())
    })
    .await;
    let sentinel = world
        .ews
        .inject(
            mailbox,
            mock_ews::NewMail {
                from: "sentinel@example.com".into(),
                subject: "sentinel".into(),
                ..Default::default()
            },
        )
        .unwrap()
        .message_id;
    eventually("the sentinel mail", PATIENCE, async || {
        delivered(world).contains(&sentinel).then_some(())
    })
    .await;
    let got = delivered(world);
    for m in sent.iter().chain([&sentinel]) {
        assert_eq!(
            got.iter().filter(|g| *g == m).count(),
            1,
            "{m} not delivered exactly once: {got:?}"
        );
    }
}

/// Waits for a worker's second login (its round's first call) after a first one rejected with
/// 401, and checks that it came
/// no sooner than half of `failed_retry_base` (the listener's `--failed-retry-base-secs`):
/// the slow schedule, not the fast retries of transient failures.
pub async fn assert_slow_second_login(world: &World, failed_retry_base: Duration) {
    let (rejected, retried) = eventually("a second login", PATIENCE, async || {
        // A worker's round begins by listing the folders to watch, then subscribes.
        let subscribes: Vec<_> = world
            .ews
            .request_log()
            .into_iter()
            .filter(|r| r.operation == "FindFolder" || r.operation == "Subscribe")
            .collect();
        let first = subscribes.iter().position(|r| r.status == 401)?;
        let next = subscribes.get(first + 1)?;
        Some((subscribes[first].at, next.at))
    })
    .await;
    let gap = retried.duration_since(rejected);
    assert!(
        gap >= failed_retry_base / 2,
        "a rejected login was tried again after {gap:?}, before half of {failed_retry_base:?}"
    );
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on this loopback port.
async fn accepting(what: &str, port: u16) {
    eventually(what, PATIENCE, async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// `redis-server`, its output dropped, killed with its handle.
fn redis_server() -> Command {
    let mut command = Command::new("redis-server");
    command.stdout(Stdio::null()).kill_on_drop(true);
    command
}

/// `redis-server` on this loopback port (0: none), keeping nothing on disk.
fn redis_on_loopback(port: u16) -> Command {
    let mut command = redis_server();
    command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
    command.args(["--save", "", "--appendonly", "no"]);
    command
}

/// Starts it, or says how to install it.
fn spawn_redis(command: &mut Command) -> Child {
    command.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start redis-server ({e}); install it with `apt-get install redis-server` \
             (ci/test.sh does when run as root)"
        )
    })
}

/// A throw-away `redis-server`, a child of the test on a Unix socket of its own (no port to
/// race for), killed when dropped.
pub struct Redis {
    child: Child,
    dir: std::path::PathBuf,
    pub url: String,
}

impl Redis {
    pub async fn start() -> Redis {
        let dir = std::env::temp_dir().join(format!("el-redis-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        let (child, url) = Redis::serve(&dir).await;
        Redis { child, dir, url }
    }

    /// Starts the server again on the same socket, empty.
    pub async fn restart(&mut self) {
        self.restart_after(Duration::ZERO).await;
    }

    /// Kills the server, and after `down` starts it again on the same socket, empty.
    pub async fn restart_after(&mut self, down: Duration) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(self.dir.join("redis.sock"));
        tokio::time::sleep(down).await;
        self.child = Redis::serve(&self.dir).await.0;
    }

    async fn serve(dir: &std::path::Path) -> (Child, String) {
        let socket = dir.join("redis.sock");
        let child = spawn_redis(
            redis_server()
                .args(["--port", "0", "--save", "", "--appendonly", "no"])
                .arg("--unixsocket")
                .arg(&socket)
                .arg("--dir")
                .arg(dir),
        );
        let url = format!("redis+unix://{}", socket.display());
        eventually("redis-server to accept connections", PATIENCE, async || {
            tokio::net::UnixStream::connect(&socket)
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        (child, url)
    }

    /// A server that speaks only TLS, on a loopback port, with a certificate from a CA of
    /// its own; `url` is `rediss://`, and the CA's PEM is returned for the client to trust.
    pub async fn start_tls() -> (Redis, Vec<u8>) {
        let dir = std::env::temp_dir().join(format!("el-redis-tls-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        test_certificates(&dir);
        let port = free_port();
        let child = spawn_redis(
            redis_on_loopback(0)
                .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
                .args([
                    "--tls-cert-file",
                    "server.crt",
                    "--tls-key-file",
                    "server.key",
                ])
                .args(["--tls-ca-cert-file", "ca.crt"])
                .current_dir(&dir),
        );
        accepting("redis-server to listen for TLS", port).await;
        let ca = std::fs::read(dir.join("ca.crt")).unwrap();
        let url = format!("rediss://127.0.0.1:{port}/0");
        (Redis { child, dir, url }, ca)
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.join("redis.sock")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A name no other test of this run uses.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A Unix-socket relay in front of a Redis, to cut one replica off from it: while cut, open
/// connections are closed and new ones refused at once.
pub struct Relay {
    pub url: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// While set, nothing passes in either direction, but every connection stays open: a
    /// network that drops packets rather than refusing them.
    silent: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(redis: &Redis) -> Relay {
        let target = redis.socket();
        let path = target.with_file_name(format!("relay-{}.sock", uuid_like()));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, q, l) = (cut.clone(), silent.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let (target, quiet) = (target.clone(), q.clone());
                l.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::UnixStream::connect(&target).await {
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = outbound.into_split();
                        tokio::join!(
                            Relay::pump(ir, ow, quiet.clone()),
                            Relay::pump(or, iw, quiet)
                        );
                    }
                }));
            }
        });
        Relay {
            url: format!("redis+unix://{}", path.display()),
            cut,
            silent,
            links,
            accept,
        }
    }

    /// Copies one direction, holding everything back while `quiet` is set.
    async fn pump(
        mut from: impl tokio::io::AsyncRead + Unpin,
        mut to: impl tokio::io::AsyncWrite + Unpin,
        quiet: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::AsyncWriteExt as _;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match tokio::io::AsyncReadExt::read(&mut from, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while quiet.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Stops every byte, keeping connections open.
    pub fn silence(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn mend(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        self.silent
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A CA of its own and a certificate it signed for 127.0.0.1 (see
/// [`mock_ews::test_certificates`]); fails the test when openssl cannot make them.
pub fn test_certificates(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    mock_ews::test_certificates(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh folder under the system's temporary one.
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("el-{what}-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A forward proxy as companies run one: `CONNECT` tunnels (what `HTTPS_PROXY` asks for) and
/// absolute-form requests (`HTTP_PROXY`). It notes each connection's method and destination.
pub struct ForwardProxy {
    pub url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ForwardProxy {
    pub async fn start() -> ForwardProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let noted = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, noted.clone()));
            }
        });
        ForwardProxy { url, seen }
    }

    /// `METHOD host:port` of every connection so far.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// One client connection: its first request says where it goes; the rest of the connection
/// is passed through (a pooled connection keeps to one destination).
async fn forward(mut client: tokio::net::TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let rest = buf[head_end..].to_vec();
    let first = head.lines().next().unwrap_or_default().to_owned();
    let mut parts = first.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (authority, path) = if method == "CONNECT" {
        (target.to_owned(), String::new())
    } else {
        let without = target.strip_prefix("http://").unwrap_or(target);
        let slash = without.find('/').unwrap_or(without.len());
        (without[..slash].to_owned(), without[slash..].to_owned())
    };
    seen.lock().unwrap().push(format!("{method} {authority}"));
    let Ok(mut server) = tokio::net::TcpStream::connect(&authority).await else {
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if method == "CONNECT" {
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    } else {
        // To the origin server, the request line names the path only.
        let origin_form = first.replacen(target, &path, 1);
        let head = head.replacen(&first, &origin_form, 1);
        if server.write_all(head.as_bytes()).await.is_err() {
            return;
        }
    }
    if server.write_all(&rest).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
