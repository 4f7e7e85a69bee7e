//! A TCP fault proxy: what a scenario puts between a replica and Redis, Exchange or Creatio.
//! It passes bytes both ways, and on the timeline's word it delays each chunk, holds
//! everything until resumed (pause: a short partition, which TCP survives), holds everything
//! and then resets what was open (blackhole: a partition long enough that TCP gave up), or
//! resets every connection and refuses new ones. Bytes are never lost from a connection that
//! lives on, as no real network loses them.

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
                tokio::spawn(connection(client, to, modes.subscribe(), stop.clone()));
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

/// Closes a socket with a reset rather than an orderly close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
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
    let Ok(server) = server else {
        return reset(client);
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
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
