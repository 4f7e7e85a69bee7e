//! A `GetStreamingEvents` request on a connection of its own, without an HTTP client's pool.
//!
//! A stream holds its connection for up to 30 minutes, mostly waiting; through the HTTP
//! client each one also kept that client's per-connection machinery (a dispatch channel, read
//! and write buffers sized for any answer, the pooled request's futures), which made up most of
//! an idle mailbox's memory. Here a stream is a socket (with TLS, the rustls session), the
//! bytes read and not yet taken, and the body's framing. It serves mailboxes that log in with Basic, a
//! bearer token or NTLM, whose handshake runs on the stream's connection before the stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use super::EwsFailure;

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 1024;
/// The most an answer's head may take.
const MAX_HEAD: usize = 64 * 1024;
/// The most a chunk-size line or a trailer line may take.
const MAX_LINE: usize = 4096;
/// The most an NTLM handshake's 401 answer's body may take (read to reuse the connection).
const MAX_HANDSHAKE_BODY: u64 = 64 * 1024;

/// What every stream of the process shares: how to reach Exchange.
#[derive(Clone)]
pub struct StreamConnections {
    /// Exchange's TLS configuration (the system's roots and `--ews-ca-file`'s).
    pub tls: Arc<rustls::ClientConfig>,
    /// Whether a host name may resolve to a link-local address.
    pub allow_link_local: bool,
    pub connect_timeout: Duration,
    pub user_agent: &'static str,
}

impl std::fmt::Debug for StreamConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConnections")
            .field("allow_link_local", &self.allow_link_local)
            .finish_non_exhaustive()
    }
}

/// How a request logs in.
pub(super) enum Login<'a> {
    Basic {
        user: &'a str,
        password: &'a str,
    },
    Bearer(&'a str),
    /// NTLM's handshake on the connection (a 401 names the scheme), then the request.
    Ntlm {
        user: &'a str,
        password: &'a str,
    },
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An answer's status line and headers.
#[derive(Debug)]
pub(super) struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// A connection to Exchange between answers.
struct Connection {
    io: Box<dyn Io>,
    buf: BytesMut,
}

/// An answer's body, read as it comes.
pub(super) struct Body {
    io: Box<dyn Io>,
    buf: BytesMut,
    framing: Framing,
    /// Whether the connection may carry another request once the body is read.
    reusable: bool,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    /// Chunked: the next thing is a chunk-size line.
    ChunkSize,
    /// Chunked: this many bytes of the current chunk are left.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: trailer lines, up to an empty one.
    Trailers,
    /// Until the server closes the connection.
    Close,
    Done,
}

fn failed(what: &str, e: impl std::fmt::Display) -> EwsFailure {
    EwsFailure::Transport(format!("{what}: {e}"))
}

impl StreamConnections {
    /// Connects to `url`, posts `body` with `headers` (each checked to be a valid header
    /// value) after the login's handshake if it has one, and reads the answer's head.
    pub(super) async fn post(
        &self,
        url: &str,
        login: Login<'_>,
        headers: &[(&str, String)],
        body: &str,
    ) -> Result<(Head, Body), EwsFailure> {
        let parsed = url::Url::parse(url)
            .map_err(|e| EwsFailure::Config(format!("the EWS URL is not valid: {e}")))?;
        let tls = match parsed.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(EwsFailure::Config(format!(
                    "the EWS URL's scheme {other:?} is neither http nor https"
                )));
            }
        };
        let host = parsed
            .host_str()
            .ok_or_else(|| EwsFailure::Config("the EWS URL names no host".into()))?;
        let port = parsed.port_or_known_default().unwrap_or(443);
        let mut request = format!(
            "POST {}{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}\r\nAccept: */*\r\nContent-Length: {}\r\n",
            parsed.path(),
            parsed.query().map(|q| format!("?{q}")).unwrap_or_default(),
            match parsed.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            },
            self.user_agent,
            body.len()
        );
        for (name, value) in headers {
            field(&mut request, name, value)?;
        }
        // Checked before connecting: a value HTTP does not allow is the configuration's.
        let authorization = match login {
            Login::Basic { user, password } => authorization(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ))?,
            Login::Bearer(token) => authorization(&format!("Bearer {token}"))?,
            Login::Ntlm { .. } => String::new(),
        };

        let connection = tokio::time::timeout(self.connect_timeout, self.connect(host, port, tls))
            .await
            .map_err(|_| EwsFailure::Transport("connection failed: timed out".into()))??;
        match login {
            Login::Ntlm { user, password } => {
                ntlm(connection, &request, user, password, body).await
            }
            _ => connection.ask(&request, &authorization, body).await,
        }
    }

    async fn connect(&self, host: &str, port: u16, tls: bool) -> Result<Connection, EwsFailure> {
        let addrs: Vec<SocketAddr> = match host.trim_matches(['[', ']']).parse() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => crate::engine::reach::GuardedResolver {
                allow_link_local: self.allow_link_local,
            }
            .lookup(host, port)
            .await
            .map_err(|e| failed("connection failed", e))?,
        };
        let mut last = None;
        let mut tcp = None;
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match (tcp, last) {
            (Some(tcp), _) => tcp,
            (None, e) => {
                return Err(failed(
                    "connection failed",
                    e.map_or_else(|| "no address".to_owned(), |e| e.to_string()),
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        if !tls {
            return Ok(Connection::new(Box::new(tcp)));
        }
        let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|_| EwsFailure::Config(format!("{host:?} is not a host name")))?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| failed("connection failed", e))?;
        Ok(Connection::new(Box::new(stream)))
    }
}

/// Adds a header line to a request's head, refusing a value HTTP does not allow.
fn field(request: &mut String, name: &str, value: &str) -> Result<(), EwsFailure> {
    if HeaderValue::from_str(value).is_err() {
        // Never the value itself: it may be a secret.
        return Err(EwsFailure::Config(format!(
            "the {name} header would carry characters HTTP does not allow"
        )));
    }
    request.push_str(name);
    request.push_str(": ");
    request.push_str(value);
    request.push_str("\r\n");
    Ok(())
}

/// The `Authorization` header line carrying `value`.
fn authorization(value: &str) -> Result<String, EwsFailure> {
    let mut line = String::new();
    field(&mut line, "Authorization", value)?;
    Ok(line)
}

impl Connection {
    fn new(io: Box<dyn Io>) -> Self {
        Connection {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Sends a request (`head`: its request line and headers, all but the login; `login`:
    /// the `Authorization` line, or nothing), and reads the answer's head.
    async fn ask(
        mut self,
        head: &str,
        login: &str,
        body: &str,
    ) -> Result<(Head, Body), EwsFailure> {
        let io = &mut self.io;
        let sent = async {
            io.write_all(head.as_bytes()).await?;
            io.write_all(login.as_bytes()).await?;
            io.write_all(b"\r\n").await?;
            io.write_all(body.as_bytes()).await?;
            io.flush().await
        };
        sent.await.map_err(|e| failed("request failed", e))?;

        let mut buf = std::mem::take(&mut self.buf);
        let head = loop {
            if let Some((head, used)) = parse_head(&buf)? {
                let _ = buf.split_to(used);
                // An interim answer (100 Continue) is followed by the real one.
                if head.status.is_informational() {
                    continue;
                }
                break head;
            }
            if buf.len() >= MAX_HEAD {
                return Err(EwsFailure::Transport(
                    "the answer's head is larger than 64 KiB".into(),
                ));
            }
            if read_more(&mut self.io, &mut buf).await? == 0 {
                return Err(EwsFailure::Transport(
                    "request failed: the connection closed before an answer".into(),
                ));
            }
        };
        let framing = framing_of(&head);
        let reusable =
            framing != Framing::Close && !lists(&head, reqwest::header::CONNECTION, "close");
        let body = Body {
            io: self.io,
            buf,
            framing,
            reusable,
        };
        Ok((head, body))
    }
}

/// NTLM's handshake on `connection`, each step carrying the request, as Exchange expects: the
/// request without a login, whose 401 names the scheme; NEGOTIATE, whose 401 carries the
/// server's CHALLENGE; AUTHENTICATE, whose answer is the request's. An answer that does not
/// go on with the handshake is the request's answer.
async fn ntlm(
    connection: Connection,
    head: &str,
    user: &str,
    password: &str,
    body: &str,
) -> Result<(Head, Body), EwsFailure> {
    let (answer, rest) = connection.ask(head, "", body).await?;
    let Some(scheme) = crate::exchange::ntlm::scheme_asked(answer.status, &answer.headers) else {
        return Ok((answer, rest));
    };
    let connection = rest.rest().await?;
    let (handshake, negotiate) = crate::exchange::ntlm::Handshake::start(user, password)
        .map_err(|e| EwsFailure::Config(e.to_string()))?;
    let negotiate = authorization(&format!("{scheme} {negotiate}"))?;
    let (answer, rest) = connection.ask(head, &negotiate, body).await?;
    let Some(challenge) = crate::exchange::ntlm::challenge_asked(answer.status, &answer.headers)
    else {
        return Ok((answer, rest));
    };
    let connection = rest.rest().await?;
    let authenticate = handshake
        .answer(&challenge)
        .map_err(|e| EwsFailure::Config(e.to_string()))?;
    let authenticate = authorization(&format!("{scheme} {authenticate}"))?;
    connection.ask(head, &authenticate, body).await
}

/// Reads what the socket has into `buf`; answers how many bytes came (0: the peer closed).
/// Each read lands on the stack and is copied over: a stream waiting here for hours holds no
/// buffer for it.
async fn read_more(io: &mut Box<dyn Io>, buf: &mut BytesMut) -> Result<usize, EwsFailure> {
    std::future::poll_fn(|cx| {
        let mut space = [0u8; READ_SIZE];
        let mut read = tokio::io::ReadBuf::new(&mut space);
        match std::pin::Pin::new(&mut **io).poll_read(cx, &mut read) {
            std::task::Poll::Ready(Ok(())) => {
                buf.extend_from_slice(read.filled());
                std::task::Poll::Ready(Ok(read.filled().len()))
            }
            std::task::Poll::Ready(Err(e)) => {
                std::task::Poll::Ready(Err(failed("request failed", e)))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
    .await
}

/// The head at the start of `buf` and its length, once complete.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, EwsFailure> {
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut answer = httparse::Response::new(&mut slots);
    let used = match answer.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(failed("the answer is not HTTP", e)),
    };
    let status = answer
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| EwsFailure::Transport("the answer has no valid status".into()))?;
    let mut headers = HeaderMap::with_capacity(answer.headers.len());
    for h in answer.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Err(EwsFailure::Transport(format!(
                "the answer's header {:?} is not valid",
                h.name
            )));
        };
        headers.append(name, value);
    }
    Ok(Some((Head { status, headers }, used)))
}

/// Whether the head's comma-separated header `name` lists `token` (case aside).
fn lists(head: &Head, name: HeaderName, token: &str) -> bool {
    head.headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

fn framing_of(head: &Head) -> Framing {
    if head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED {
        return Framing::Done;
    }
    if lists(head, reqwest::header::TRANSFER_ENCODING, "chunked") {
        return Framing::ChunkSize;
    }
    match head
        .headers
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    }
}

/// A line ending in CRLF at the start of `buf`: its text and length with the CRLF.
fn line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, EwsFailure> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((&buf[..end], end + 2))),
        None if buf.len() > MAX_LINE => Err(EwsFailure::Transport(
            "a chunked body's line is longer than 4 KiB".into(),
        )),
        None => Ok(None),
    }
}

impl Body {
    /// The next part of the body; `None` at its end. Waits as long as the server is silent.
    pub(super) async fn chunk(&mut self) -> Result<Option<Bytes>, EwsFailure> {
        loop {
            if let Some(step) = self.step()? {
                return Ok(step);
            }
            if read_more(&mut self.io, &mut self.buf).await? == 0 {
                return match self.framing {
                    Framing::Close => {
                        self.framing = Framing::Done;
                        Ok(None)
                    }
                    Framing::Done => Ok(None),
                    _ => Err(EwsFailure::Transport(
                        "request failed: the connection closed inside the answer".into(),
                    )),
                };
            }
        }
    }

    /// One step on what is buffered: `Some` with what to answer, `None` to read more.
    fn step(&mut self) -> Result<Option<Option<Bytes>>, EwsFailure> {
        loop {
            match self.framing {
                Framing::Done => return Ok(Some(None)),
                Framing::Close if !self.buf.is_empty() => {
                    return Ok(Some(Some(self.take(self.buf.len()))));
                }
                Framing::Close => return Ok(None),
                Framing::Length(left) | Framing::ChunkData(left) if !self.buf.is_empty() => {
                    let n = (left as usize).min(self.buf.len());
                    let left = left - n as u64;
                    self.framing = match (self.framing, left) {
                        (Framing::Length(_), 0) => Framing::Done,
                        (Framing::Length(_), _) => Framing::Length(left),
                        (_, 0) => Framing::ChunkEnd,
                        _ => Framing::ChunkData(left),
                    };
                    return Ok(Some(Some(self.take(n))));
                }
                Framing::Length(_) | Framing::ChunkData(_) => return Ok(None),
                Framing::ChunkEnd => {
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err(EwsFailure::Transport(
                            "a chunk of the answer does not end with CRLF".into(),
                        ));
                    }
                    let _ = self.buf.split_to(2);
                    self.framing = Framing::ChunkSize;
                }
                Framing::ChunkSize => {
                    let Some((text, used)) = line(&self.buf)? else {
                        return Ok(None);
                    };
                    let size = text.split(|b| *b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                        .ok_or_else(|| {
                            EwsFailure::Transport("a chunk size of the answer is not hex".into())
                        })?;
                    let _ = self.buf.split_to(used);
                    self.framing = if size == 0 {
                        Framing::Trailers
                    } else {
                        Framing::ChunkData(size)
                    };
                }
                Framing::Trailers => {
                    let Some((text, used)) = line(&self.buf)? else {
                        return Ok(None);
                    };
                    let last = text.is_empty();
                    let _ = self.buf.split_to(used);
                    if last {
                        self.framing = Framing::Done;
                    }
                }
            }
        }
    }

    /// The next `n` buffered bytes. The buffer is let go of once empty, so an idle stream
    /// holds none.
    fn take(&mut self, n: usize) -> Bytes {
        let out = self.buf.split_to(n).freeze();
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        out
    }

    /// Reads the body to its end (a handshake's small answer) for the connection's next
    /// request.
    async fn rest(mut self) -> Result<Connection, EwsFailure> {
        let mut read = 0u64;
        while let Some(part) = self.chunk().await? {
            read += part.len() as u64;
            if read > MAX_HANDSHAKE_BODY {
                return Err(EwsFailure::Transport(
                    "an NTLM handshake's answer is larger than 64 KiB".into(),
                ));
            }
        }
        if !self.reusable {
            return Err(EwsFailure::Transport(
                "the server closed the connection inside the NTLM handshake".into(),
            ));
        }
        Ok(Connection {
            io: self.io,
            buf: self.buf,
        })
    }

    /// The whole rest of the body, failing past `limit` bytes; `None` then.
    pub(super) async fn read_capped(mut self, limit: u64) -> Result<Option<Bytes>, EwsFailure> {
        if let Framing::Length(n) = self.framing
            && n > limit
        {
            return Ok(None);
        }
        let mut body = BytesMut::new();
        while let Some(part) = self.chunk().await? {
            if body.len() as u64 + part.len() as u64 > limit {
                return Ok(None);
            }
            body.extend_from_slice(&part);
        }
        Ok(Some(body.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt as _;

    /// A body whose bytes come in the given pieces, then the connection closes.
    fn body_of(framing: Framing, pieces: Vec<Vec<u8>>) -> Body {
        Body {
            io: Box::new(socket(pieces)),
            buf: BytesMut::new(),
            framing,
            reusable: false,
        }
    }

    /// A socket that hands out `pieces` one read at a time, then closes.
    fn socket(pieces: Vec<Vec<u8>>) -> impl Io {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            for p in pieces {
                if server.write_all(&p).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        client
    }

    async fn all(mut body: Body) -> Result<Vec<u8>, EwsFailure> {
        let mut out = Vec::new();
        while let Some(part) = body.chunk().await? {
            out.extend_from_slice(&part);
        }
        Ok(out)
    }

    fn chunked(parts: &[&[u8]]) -> Vec<u8> {
        let mut wire = Vec::new();
        for p in parts {
            wire.extend_from_slice(format!("{:x};ext=1\r\n", p.len()).as_bytes());
            wire.extend_from_slice(p);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
        wire
    }

    fn pieces(wire: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([wire.len()]) {
            if c > at {
                out.push(wire[at..c].to_vec());
                at = c;
            }
        }
        out
    }

    /// Reads a whole body framed so, from a socket that hands out `pieces`.
    fn read(framing: Framing, pieces: Vec<Vec<u8>>) -> Result<Vec<u8>, EwsFailure> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { all(body_of(framing, pieces)).await })
    }

    proptest! {
        /// However the socket cuts a chunked body, its data comes out whole and in order.
        #[test]
        fn a_chunked_body_cut_anywhere_reads_whole(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let wire = chunked(&refs);
            let got = read(Framing::ChunkSize, pieces(&wire, &cuts)).unwrap();
            prop_assert_eq!(got, parts.concat());
        }

        #[test]
        fn a_body_of_known_length_reads_whole(
            data in proptest::collection::vec(any::<u8>(), 1..2000),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let framing = Framing::Length(data.len() as u64);
            let got = read(framing, pieces(&data, &cuts)).unwrap();
            prop_assert_eq!(got, data);
        }
    }

    #[test]
    fn a_body_cut_short_or_malformed_is_a_failure() {
        let cut = chunked(&[b"hello"]);
        let cut = cut[..cut.len() - 8].to_vec();
        assert!(read(Framing::ChunkSize, vec![cut]).is_err());
        let not_hex = b"zz\r\nhello\r\n0\r\n\r\n".to_vec();
        assert!(read(Framing::ChunkSize, vec![not_hex]).is_err());
        let no_crlf = b"5\r\nhelloXX0\r\n\r\n".to_vec();
        assert!(read(Framing::ChunkSize, vec![no_crlf]).is_err());
        assert!(read(Framing::Length(10), vec![b"short".to_vec()]).is_err());
        assert_eq!(
            read(Framing::Close, vec![b"to the end".to_vec()]).unwrap(),
            b"to the end"
        );
    }

    /// Exchange played by a socket that reads one request and answers `answer`; answers the
    /// request as it came.
    async fn exchange_answering(
        answer: &'static [u8],
    ) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/EWS/Exchange.asmx?x=1",
            listener.local_addr().unwrap()
        );
        let seen = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut part = [0u8; 1024];
            loop {
                let n = socket.read(&mut part).await.unwrap();
                request.extend_from_slice(&part[..n]);
                if n == 0 || request.ends_with(b"<body/>") {
                    break;
                }
            }
            socket.write_all(answer).await.unwrap();
            request
        });
        (url, seen)
    }

    fn connections() -> StreamConnections {
        StreamConnections {
            tls: crate::imap::trusting_no_one(),
            allow_link_local: false,
            connect_timeout: Duration::from_secs(5),
            user_agent: "exchange-listener/test",
        }
    }

    #[tokio::test]
    async fn a_stream_is_posted_as_http_1_1_and_its_chunks_read_as_they_come() {
        let (url, seen) = exchange_answering(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: X-BackEndOverrideCookie=abc\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
        let login = Login::Basic {
            user: "alice@contoso.test",
            password: "pässword",
        };
        let headers = [("X-AnchorMailbox", "alice@contoso.test".to_owned())];
        let (head, body) = connections()
            .post(&url, login, &headers, "<body/>")
            .await
            .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["set-cookie"], "X-BackEndOverrideCookie=abc");
        let mut body = body;
        let mut text = Vec::new();
        while let Some(part) = body.chunk().await.unwrap() {
            text.extend_from_slice(&part);
        }
        assert_eq!(text, b"hello world");

        let request = String::from_utf8(seen.await.unwrap()).unwrap();
        let (head, sent) = request.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("POST /EWS/Exchange.asmx?x=1 HTTP/1.1"));
        let fields: Vec<&str> = lines.collect();
        let host = url.trim_start_matches("http://").split('/').next().unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode("alice@contoso.test:pässword");
        for field in [
            format!("Host: {host}"),
            "Content-Length: 7".to_owned(),
            "X-AnchorMailbox: alice@contoso.test".to_owned(),
            format!("Authorization: Basic {basic}"),
        ] {
            assert!(
                fields.contains(&field.as_str()),
                "{field} not in {fields:?}"
            );
        }
        assert_eq!(sent, "<body/>");
    }

    #[tokio::test]
    async fn a_header_that_would_break_the_request_is_refused_without_saying_its_value() {
        let login = Login::Bearer("token\r\nX-Evil: 1");
        let e = connections()
            .post(
                "http://127.0.0.1:9/EWS/Exchange.asmx",
                login,
                &[],
                "<body/>",
            )
            .await
            .unwrap_err();
        let said = e.to_string();
        assert!(
            said.contains("Authorization") && !said.contains("Evil"),
            "{said}"
        );
    }

    /// NTLM authenticates a connection: its handshake and the request share the stream's
    /// socket, so Exchange (played by mock-ews, which keeps NTLM per connection) takes the
    /// request as the mailbox; a wrong password ends in the handshake's 401.
    #[tokio::test]
    async fn an_ntlm_login_runs_its_handshake_on_the_stream_s_own_connection() {
        let (ews, body) = exchange_taking_only_ntlm().await;
        let headers = [("Content-Type", "text/xml; charset=utf-8".to_owned())];
        let post = async |login| {
            let (head, answer) = connections()
                .post(&ews.ews_url(), login, &headers, &body)
                .await
                .unwrap();
            let _ = answer.read_capped(1 << 20).await.unwrap();
            head.status
        };

        let basic = Login::Basic {
            user: "alice@contoso.test",
            password: "secret",
        };
        assert_eq!(post(basic).await, StatusCode::UNAUTHORIZED, "Basic is off");
        let ntlm = Login::Ntlm {
            user: "alice@contoso.test",
            password: "secret",
        };
        assert_ne!(post(ntlm).await, StatusCode::UNAUTHORIZED);
        let log = ews.request_log();
        let last: Vec<(u16, &str)> = log[log.len() - 3..]
            .iter()
            .map(|r| (r.status, r.mailbox.as_str()))
            .collect();
        assert_eq!(last[..2], [(401, ""), (401, "")], "{log:?}");
        assert_eq!(last[2].1, "alice@contoso.test", "{log:?}");

        let wrong = Login::Ntlm {
            user: "alice@contoso.test",
            password: "wrong",
        };
        assert_eq!(post(wrong).await, StatusCode::UNAUTHORIZED);
    }

    /// mock-ews taking only NTLM, with alice's mailbox; a request body for it.
    async fn exchange_taking_only_ntlm() -> (mock_ews::MockEws, String) {
        let ews =
            mock_ews::MockEws::start("127.0.0.1:0".parse().unwrap(), mock_ews::Config::default())
                .await
                .unwrap();
        ews.set_settings(mock_ews::Settings {
            auth: Some("ntlm".into()),
            ..mock_ews::Settings::default()
        });
        ews.create_mailbox("alice@contoso.test", "secret").unwrap();
        let header = ews::request::RequestHeader {
            version: ews::request::ServerVersion::Exchange2013,
            impersonate: None,
        };
        let body = ews::request::get_streaming_events(&header, &["unknown"], 1);
        (ews, body)
    }

    /// NTLM's login belongs to its connection: one opened later from the port of one that
    /// logged in and closed (ports are reused under load) must log in again. mock-ews once
    /// kept logins by the client's address, and served mail of one mailbox to another.
    #[tokio::test]
    async fn an_ntlm_login_ends_with_its_connection_even_where_the_port_is_reused() {
        let (ews, body) = exchange_taking_only_ntlm().await;
        let head = format!(
            "POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\n",
            ews.addr(),
            body.len()
        );
        let connect = async |port: u16| {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            socket
                .bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .unwrap();
            let tcp = socket.connect(ews.addr()).await.unwrap();
            // Closed with a reset, so the port is free again at once.
            tcp.set_zero_linger().unwrap();
            let port = tcp.local_addr().unwrap().port();
            (Connection::new(Box::new(tcp)), port)
        };

        let (first, port) = connect(0).await;
        let (answer, rest) = ntlm(first, &head, "alice@contoso.test", "secret", &body)
            .await
            .unwrap();
        assert_ne!(answer.status, StatusCode::UNAUTHORIZED);
        drop(rest);

        let (second, again) = connect(port).await;
        assert_eq!(again, port);
        let (answer, _) = second.ask(&head, "", &body).await.unwrap();
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn heads_are_read_once_complete() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: a=b\r\nSet-Cookie: c=d\r\n\r\nrest";
        assert!(parse_head(&head[..20]).unwrap().is_none());
        let (h, used) = parse_head(head).unwrap().unwrap();
        assert_eq!(&head[used..], b"rest");
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.headers.get_all("set-cookie").iter().count(), 2);
        assert_eq!(framing_of(&h), Framing::ChunkSize);
        let (h, _) =
            parse_head(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 12\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(framing_of(&h), Framing::Length(12));
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
