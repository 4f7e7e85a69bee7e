//! A TCP fault proxy: what a scenario puts between a replica and Redis, Exchange or Creatio.
//! It passes bytes both ways, and on the timeline's word it delays each chunk, holds
//! everything until resumed (pause: a short partition, which TCP survives), holds everything
//! and then resets what was open (blackhole: a partition long enough that TCP gave up), or
//! resets every connection and refuses new ones. Bytes are never lost from a connection that
//! lives on, as no real network loses them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does to the bytes that pass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Bytes pass as they come.
    Pass,
    /// Each chunk waits this many milliseconds before it is passed on.
    Latency(u64),
    /// Nothing passes; when the mode changes, the connections that were open are reset.
    Blackhole,
    /// Bytes wait, unread, until another mode is set; then they pass.
    Pause,
    /// Every connection is reset, and new ones are reset as they come.
    Reset,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    upstream: Arc<Mutex<SocketAddr>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on a free loopback port and passes what comes to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let upstream = Arc::new(Mutex::new(upstream));
        let stop = CancellationToken::new();
        let proxy = Proxy {
            addr,
            mode,
            upstream: upstream.clone(),
            stop: stop.clone(),
        };
        let modes = proxy.mode.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                let to = *upstream.lock().unwrap_or_else(|p| p.into_inner());
                let mode = modes.subscribe();
                tokio::spawn(connection(
                    client,
                    to,
                    Vec::new(),
                    Vec::new(),
                    mode,
                    stop.clone(),
                ));
            }
        });
        Ok(proxy)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Sends new connections elsewhere (a server restarted on another port).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) = upstream;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A forward proxy for one replica's HTTP clients (named by its `HTTPS_PROXY`/`HTTP_PROXY`):
/// `CONNECT` tunnels and absolute-form requests, each passed to its destination under the
/// mode set for that destination (pass for any other). So one replica can lose Exchange, or
/// Creatio, while the others keep theirs.
#[derive(Debug)]
pub struct ForwardProxy {
    addr: SocketAddr,
    routes: Arc<Mutex<HashMap<SocketAddr, watch::Sender<Mode>>>>,
    stop: CancellationToken,
}

impl ForwardProxy {
    pub async fn start() -> std::io::Result<ForwardProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let routes: Arc<Mutex<HashMap<SocketAddr, watch::Sender<Mode>>>> = Arc::default();
        let stop = CancellationToken::new();
        let (table, stopping) = (routes.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stopping.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                tokio::spawn(forward(client, table.clone(), stopping.clone()));
            }
        });
        Ok(ForwardProxy { addr, routes, stop })
    }

    /// The URL to put in `HTTPS_PROXY` and `HTTP_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What happens to connections to `destination`, from now on.
    pub fn set_mode(&self, destination: SocketAddr, mode: Mode) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .entry(destination)
            .or_insert_with(|| watch::channel(Mode::Pass).0)
            .send_replace(mode);
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One client connection of a forward proxy: its first request names the destination; the
/// rest of the connection goes there too (a pooled connection keeps to one destination).
async fn forward(
    mut client: TcpStream,
    routes: Arc<Mutex<HashMap<SocketAddr, watch::Sender<Mode>>>>,
    stop: CancellationToken,
) {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return reset(client);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let first = head.lines().next().unwrap_or_default().to_owned();
    let mut words = first.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let connect = method == "CONNECT";
    let (authority, path) = if connect {
        (target, "")
    } else {
        let rest = target.strip_prefix("http://").unwrap_or(target);
        rest.split_at(rest.find('/').unwrap_or(rest.len()))
    };
    let Some(destination) = tokio::net::lookup_host(authority)
        .await
        .ok()
        .and_then(|mut a| a.next())
    else {
        return reset(client);
    };
    let mode = routes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(destination)
        .or_insert_with(|| watch::channel(Mode::Pass).0)
        .subscribe();
    // What goes to the destination first: nothing for a tunnel (the client speaks TLS once
    // told it is open), else the request with its line in origin form.
    let (to_server, to_client) = if connect {
        (
            buf[head_end..].to_vec(),
            b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec(),
        )
    } else {
        let origin = first.replacen(target, if path.is_empty() { "/" } else { path }, 1);
        let mut first_bytes = head.replacen(&first, &origin, 1).into_bytes();
        first_bytes.extend_from_slice(&buf[head_end..]);
        (first_bytes, Vec::new())
    };
    connection(client, destination, to_server, to_client, mode, stop).await;
}

/// Closes a socket with a reset rather than an orderly close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Passes one connection to `upstream` under `mode`, after sending `to_server` there and
/// `to_client` back (what a forward proxy read or owes before the bytes flow).
async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    mut mode: watch::Receiver<Mode>,
    stop: CancellationToken,
) {
    if *mode.borrow_and_update() == Mode::Reset {
        return reset(client);
    }
    let server = tokio::select! {
        _ = stop.cancelled() => return,
        s = TcpStream::connect(upstream) => s,
    };
    let Ok(mut server) = server else {
        return reset(client);
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    if server.write_all(&to_server).await.is_err() || client.write_all(&to_client).await.is_err() {
        return reset(client);
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, mode.clone());
    let down = pump(server_read, client_write, mode);
    let ((client_read, server_write), (server_read, client_write)) = tokio::select! {
        _ = stop.cancelled() => return,
        ends = async { tokio::join!(up, down) } => ends,
    };
    // A reset hands both sockets back whole: they go with RST, not an orderly close.
    if let (Some(r), Some(w)) = (client_read, client_write)
        && let Ok(client) = r.reunite(w)
    {
        reset(client);
    }
    if let (Some(r), Some(w)) = (server_read, server_write)
        && let Ok(server) = r.reunite(w)
    {
        reset(server);
    }
}

/// Copies one direction until either side ends, or the proxy is reset: then it hands its
/// halves back so the sockets can be reset whole.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) -> (
    Option<tokio::net::tcp::OwnedReadHalf>,
    Option<tokio::net::tcp::OwnedWriteHalf>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut blackholed = false;
    loop {
        let current = *mode.borrow_and_update();
        // A connection that lived through a blackhole is reset when it ends.
        if current == Mode::Reset || (blackholed && current != Mode::Blackhole) {
            return (Some(from), Some(to));
        }
        blackholed |= current == Mode::Blackhole;
        let holding = matches!(current, Mode::Pause | Mode::Blackhole);
        let n = tokio::select! {
            r = from.read(&mut buf), if !holding => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return (None, None);
                }
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return (None, None);
                }
                continue;
            }
        };
        if let Mode::Latency(ms) = current {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return (None, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        s.write_all(b"ping").await.ok()?;
        let mut got = [0u8; 4];
        match timeout(wait, s.read_exact(&mut got)).await {
            Ok(Ok(_)) => Some(got.to_vec()),
            _ => None,
        }
    }

    const LONG: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn passes_holds_blackholes_and_resets() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut s, LONG).await.as_deref(),
            Some(&b"ping"[..])
        );

        // Held while paused, delivered on resume.
        proxy.set_mode(Mode::Pause);
        assert_eq!(round_trip(&mut s, SHORT).await, None);
        proxy.set_mode(Mode::Pass);
        let mut got = [0u8; 4];
        timeout(LONG, s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"ping");

        // A blackhole: nothing passes, and what was open is reset when it ends; a new
        // connection then works.
        proxy.set_mode(Mode::Blackhole);
        assert_eq!(round_trip(&mut s, SHORT).await, None);
        proxy.set_mode(Mode::Pass);
        let mut buf = [0u8; 1];
        let ended = timeout(LONG, s.read(&mut buf)).await.unwrap();
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut s, LONG).await.as_deref(),
            Some(&b"ping"[..])
        );

        // Reset: the open connection ends, and a new one is refused.
        proxy.set_mode(Mode::Reset);
        let mut buf = [0u8; 1];
        let ended = timeout(LONG, s.read(&mut buf)).await.unwrap();
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut again, SHORT).await, None);
        proxy.set_mode(Mode::Pass);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut fresh, LONG).await.as_deref(),
            Some(&b"ping"[..])
        );
    }

    #[tokio::test]
    async fn a_forward_proxy_tunnels_and_cuts_one_destination_only() {
        let (a, b) = (echo().await, echo().await);
        let proxy = ForwardProxy::start().await.unwrap();
        let open = |to: SocketAddr| {
            let proxy = proxy.addr;
            async move {
                let mut s = TcpStream::connect(proxy).await.unwrap();
                s.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut answer = vec![0u8; 39];
                timeout(LONG, s.read_exact(&mut answer))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
                s
            }
        };
        let (mut to_a, mut to_b) = (open(a).await, open(b).await);
        assert_eq!(
            round_trip(&mut to_a, LONG).await.as_deref(),
            Some(&b"ping"[..])
        );
        proxy.set_mode(b, Mode::Pause);
        assert_eq!(round_trip(&mut to_b, SHORT).await, None, "b is held");
        assert_eq!(
            round_trip(&mut to_a, LONG).await.as_deref(),
            Some(&b"ping"[..]),
            "a is not"
        );
        proxy.set_mode(b, Mode::Pass);
        let mut got = [0u8; 4];
        timeout(LONG, to_b.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();

        // An absolute-form request reaches its destination in origin form.
        let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
        let request = format!("GET http://{a}/x HTTP/1.1\r\nHost: {a}\r\n\r\n");
        plain.write_all(request.as_bytes()).await.unwrap();
        let want = format!("GET /x HTTP/1.1\r\nHost: {a}\r\n\r\n");
        let mut echoed = vec![0u8; want.len()];
        timeout(LONG, plain.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&echoed), want);
    }

    #[tokio::test]
    async fn delays_each_chunk_and_follows_a_moved_upstream() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        proxy.set_mode(Mode::Latency(400));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        // 400 ms each way: nothing within 300 ms, the echo within five seconds.
        assert_eq!(round_trip(&mut s, SHORT).await, None);
        let mut got = [0u8; 4];
        timeout(LONG, s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();

        proxy.set_mode(Mode::Pass);
        proxy.set_upstream(echo().await);
        let mut moved = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut moved, LONG).await.as_deref(),
            Some(&b"ping"[..])
        );
    }
}
