//! One IMAP connection: TCP, TLS (implicit or STARTTLS), the greeting, the login, then
//! commands and their answers. Answers are read with `imap-codec`, which knows nothing of
//! sockets: bytes are read into a buffer until a whole response decodes, so a literal split
//! across reads, or a response split anywhere, reads the same. A literal larger than the
//! limit on answers fails the connection before it is read.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use imap_codec::decode::{Decoder, GreetingDecodeError, ResponseDecodeError};
use imap_codec::imap_types::core::NString;
use imap_codec::imap_types::fetch::MessageDataItem;
use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::imap_types::response::{Code, Data, GreetingKind, Response, Status};
use imap_codec::imap_types::status::StatusDataItem;
use imap_codec::{GreetingCodec, ResponseCodec};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::failure::ImapFailure;
use crate::creatio::contract::Secret;
use crate::engine::protocol::Limits;

/// A byte stream a session talks over: TCP, or TLS over it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// How the connection is protected (Creatio's `SecureOption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain text.
    None,
    /// Implicit TLS on 993; STARTTLS where the server offers it; else refused.
    Auto,
    /// TLS from the first byte.
    Tls,
    /// Plain text upgraded with STARTTLS before the login.
    StartTls,
}

/// Where and how to reach an IMAP server.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub security: Security,
}

/// How to log in.
#[derive(Debug, Clone)]
pub enum Login {
    Password {
        user: String,
        password: Secret,
    },
    /// OAuth: XOAUTH2 with the access token.
    Token {
        user: String,
        token: Secret,
    },
}

impl Login {
    /// The user the server knows.
    pub fn user(&self) -> &str {
        match self {
            Login::Password { user, .. } | Login::Token { user, .. } => user,
        }
    }
}

/// An untagged answer, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Untagged {
    Exists(u32),
    Search(Vec<u32>),
    Fetch {
        uid: Option<u32>,
        body: Option<Vec<u8>>,
        received_unix_ms: Option<i64>,
    },
    List {
        name: String,
        delimiter: Option<char>,
        attributes: Vec<String>,
    },
    Status {
        mailbox: String,
        uid_next: Option<u32>,
        uid_validity: Option<u32>,
    },
    Capabilities(Vec<String>),
    UidValidity(u32),
    UidNext(u32),
    Bye(String),
    /// Anything else (FLAGS, RECENT, EXPUNGE, an informational OK).
    Other,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Done {
    pub ok: bool,
    pub text: String,
    /// The server says a limit was reached (`[LIMIT]`, RFC 5530).
    pub limit: bool,
    /// The server says the failure is temporary (`[UNAVAILABLE]`, `[SERVERBUG]`: RFC 5530).
    pub temporary: bool,
    /// The capabilities the answer announced (`[CAPABILITY …]`, as servers end a login).
    pub capabilities: Option<Vec<String>>,
}

enum Reply {
    Untagged(Untagged),
    Continue,
    Tagged { tag: String, done: Done },
}

/// An open, logged-in connection.
pub(crate) struct Session {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    tag: u32,
    capabilities: Vec<String>,
    limits: Limits,
    /// Its place among the connections its login may hold, given back when it closes.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The folders besides the selected one NOTIFY (RFC 5465) was asked to report on.
    pub(crate) notifying: Option<Vec<String>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

/// TLS over `io`, the server's name or address checked as `tls` says.
pub(crate) async fn wrap_tls(
    io: Box<dyn Io>,
    host: &str,
    tls: &Arc<rustls::ClientConfig>,
    limits: Limits,
) -> Result<tokio_rustls::client::TlsStream<Box<dyn Io>>, ImapFailure> {
    Session::wrap_boxed(io, host, tls, limits).await
}

fn io_failure(e: std::io::Error) -> ImapFailure {
    ImapFailure::Unreachable(crate::engine::protocol::error_chain(&e))
}

/// A string as an IMAP quoted string. CR, LF and NUL cannot be quoted: refused.
pub(crate) fn quoted(s: &str) -> Result<String, ImapFailure> {
    if s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(ImapFailure::Config(
            "a name or password holds a line break, which IMAP cannot carry".into(),
        ));
    }
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

impl Session {
    /// Connects, protects the connection as `endpoint` says, and logs in.
    pub(crate) async fn open(
        endpoint: &Endpoint,
        login: &Login,
        tls: &Arc<rustls::ClientConfig>,
        limits: Limits,
    ) -> Result<Session, ImapFailure> {
        let address = (endpoint.host.as_str(), endpoint.port);
        let tcp = tokio::time::timeout(limits.request_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| ImapFailure::Unreachable("connecting timed out".into()))?
            .map_err(io_failure)?;
        let _ = tcp.set_nodelay(true);
        Self::over(Box::new(tcp), endpoint, login, tls, limits).await
    }

    /// The greeting, TLS as `endpoint` says, and the login, over a connection made already.
    pub(crate) async fn over(
        io: Box<dyn Io>,
        endpoint: &Endpoint,
        login: &Login,
        tls: &Arc<rustls::ClientConfig>,
        limits: Limits,
    ) -> Result<Session, ImapFailure> {
        let implicit = match endpoint.security {
            Security::Tls => true,
            Security::Auto => endpoint.port == 993,
            Security::None | Security::StartTls => false,
        };
        let io: Box<dyn Io> = if implicit {
            Box::new(Self::wrap_boxed(io, &endpoint.host, tls, limits).await?)
        } else {
            io
        };
        let mut session = Session {
            io,
            buf: Vec::new(),
            tag: 0,
            capabilities: Vec::new(),
            limits,
            slot: None,
            notifying: None,
        };
        session.greeting().await?;
        if !implicit && endpoint.security != Security::None {
            if session.capabilities.is_empty() {
                session.capability().await?;
            }
            if !session.has("STARTTLS") {
                return Err(ImapFailure::Config(
                    "the IMAP server offers no TLS on this port (no STARTTLS); use port 993 with SSL, or SecureOption None to send the password in plain text"
                        .into(),
                ));
            }
            session.ok("STARTTLS").await?;
            if !session.buf.is_empty() {
                return Err(ImapFailure::Malformed(
                    "data after the answer to STARTTLS".into(),
                ));
            }
            let plain = std::mem::replace(&mut session.io, Box::new(tokio::io::duplex(1).0));
            session.io = Box::new(Self::wrap_boxed(plain, &endpoint.host, tls, limits).await?);
            // What the server said before TLS cannot be trusted.
            session.capabilities.clear();
        }
        if session.capabilities.is_empty() {
            session.capability().await?;
        }
        session.login(login).await?;
        Ok(session)
    }

    async fn wrap_boxed(
        io: Box<dyn Io>,
        host: &str,
        tls: &Arc<rustls::ClientConfig>,
        limits: Limits,
    ) -> Result<tokio_rustls::client::TlsStream<Box<dyn Io>>, ImapFailure> {
        let name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| ImapFailure::Config(format!("{host:?} is not a host name")))?;
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        tokio::time::timeout(limits.request_timeout, connector.connect(name, io))
            .await
            .map_err(|_| ImapFailure::Unreachable("the TLS handshake timed out".into()))?
            .map_err(io_failure)
    }

    /// Holds `slot` for as long as the session is open.
    pub(crate) fn hold(&mut self, slot: tokio::sync::OwnedSemaphorePermit) {
        self.slot = Some(slot);
    }

    /// Whether the server said it has this capability (upper case).
    pub(crate) fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    async fn greeting(&mut self) -> Result<(), ImapFailure> {
        loop {
            match GreetingCodec::default().decode(&self.buf) {
                Ok((rest, greeting)) => {
                    let consumed = self.buf.len() - rest.len();
                    if greeting.kind == GreetingKind::Bye {
                        return Err(ImapFailure::Closed(greeting.text.as_ref().to_owned()));
                    }
                    if let Some(Code::Capability(caps)) = &greeting.code {
                        self.capabilities = caps
                            .as_ref()
                            .iter()
                            .map(|c| c.to_string().to_ascii_uppercase())
                            .collect();
                    }
                    self.buf.drain(..consumed);
                    return Ok(());
                }
                Err(GreetingDecodeError::Incomplete) => {
                    self.read_more(self.limits.request_timeout).await?
                }
                Err(GreetingDecodeError::Failed) => {
                    return Err(ImapFailure::Malformed("not an IMAP greeting".into()));
                }
            }
        }
    }

    async fn capability(&mut self) -> Result<(), ImapFailure> {
        for u in self.ok("CAPABILITY").await? {
            if let Untagged::Capabilities(caps) = u {
                self.capabilities = caps;
            }
        }
        Ok(())
    }

    async fn login(&mut self, login: &Login) -> Result<(), ImapFailure> {
        let (mechanism, initial) = match login {
            Login::Password { user, password } => {
                if !self.has("AUTH=PLAIN") {
                    if self.has("LOGINDISABLED") {
                        return Err(ImapFailure::Config(
                            "the IMAP server refuses logins on this connection (LOGINDISABLED): use TLS"
                                .into(),
                        ));
                    }
                    let command = format!("LOGIN {} {}", quoted(user)?, quoted(password.expose())?);
                    return self.authenticated(&command, "LOGIN").await;
                }
                let raw = format!("\0{user}\0{}", password.expose());
                ("PLAIN", raw)
            }
            // XOAUTH2 (Gmail, Microsoft 365) unless the server offers only OAUTHBEARER
            // (RFC 7628), whose header names the user with `,` and `=` escaped.
            Login::Token { user, token }
                if self.has("AUTH=XOAUTH2") || !self.has("AUTH=OAUTHBEARER") =>
            {
                let raw = format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose());
                ("XOAUTH2", raw)
            }
            Login::Token { user, token } => {
                let user = user.replace('=', "=3D").replace(',', "=2C");
                let raw = format!("n,a={user},\x01auth=Bearer {}\x01\x01", token.expose());
                ("OAUTHBEARER", raw)
            }
        };
        let initial = base64::engine::general_purpose::STANDARD.encode(initial);
        if self.has("SASL-IR") {
            let command = format!("AUTHENTICATE {mechanism} {initial}");
            return self.authenticated(&command, "AUTHENTICATE").await;
        }
        let tag = self.send(&format!("AUTHENTICATE {mechanism}")).await?;
        let mut sent = false;
        loop {
            match self.reply(self.limits.request_timeout).await? {
                Reply::Continue if !sent => {
                    self.write(format!("{initial}\r\n").as_bytes()).await?;
                    sent = true;
                }
                // A server that explains a refusal in a challenge: the empty answer ends it.
                Reply::Continue => self.write(b"\r\n").await?,
                Reply::Untagged(_) => {}
                Reply::Tagged { tag: t, done } if t == tag => {
                    return self.logged_in(Vec::new(), done).await;
                }
                Reply::Tagged { .. } => {}
            }
        }
    }

    async fn authenticated(&mut self, command: &str, name: &str) -> Result<(), ImapFailure> {
        let (untagged, done) = self.run_named(command, name).await?;
        self.logged_in(untagged, done).await
    }

    /// The end of a login. What the server offers changes with it: the capabilities it
    /// announced then, else asked for.
    async fn logged_in(&mut self, untagged: Vec<Untagged>, done: Done) -> Result<(), ImapFailure> {
        if done.ok {
            let announced = untagged
                .into_iter()
                .filter_map(|u| match u {
                    Untagged::Capabilities(caps) => Some(caps),
                    _ => None,
                })
                .next_back()
                .or(done.capabilities);
            match announced {
                Some(caps) => self.capabilities = caps,
                None => self.capability().await?,
            }
            Ok(())
        } else if done.limit || done.temporary {
            // Not the credentials: the server cannot log anyone in just now.
            Err(ImapFailure::Refused {
                command: "the login".into(),
                text: done.text,
                limit: done.limit,
            })
        } else {
            Err(ImapFailure::Rejected(done.text))
        }
    }

    /// Runs a command; its untagged answers, or a failure when it did not end OK.
    pub(crate) async fn ok(&mut self, command: &str) -> Result<Vec<Untagged>, ImapFailure> {
        let name = command.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let (untagged, done) = self.run_named(command, &name).await?;
        if done.ok {
            Ok(untagged)
        } else {
            Err(ImapFailure::Refused {
                command: name,
                text: done.text,
                limit: done.limit,
            })
        }
    }

    async fn run_named(
        &mut self,
        command: &str,
        name: &str,
    ) -> Result<(Vec<Untagged>, Done), ImapFailure> {
        let tag = self.send(command).await?;
        let mut untagged = Vec::new();
        loop {
            match self.reply(self.limits.request_timeout).await? {
                Reply::Untagged(Untagged::Bye(text)) => {
                    // A BYE before the answer: the server is closing.
                    if name != "LOGOUT" {
                        return Err(ImapFailure::Closed(text));
                    }
                }
                Reply::Untagged(u) => untagged.push(u),
                Reply::Continue => {
                    return Err(ImapFailure::Malformed(format!(
                        "a continuation request in the middle of {name}"
                    )));
                }
                Reply::Tagged { tag: t, done } if t == tag => return Ok((untagged, done)),
                Reply::Tagged { .. } => {}
            }
        }
    }

    /// Sends a command under a new tag; answers the tag.
    pub(crate) async fn send(&mut self, command: &str) -> Result<String, ImapFailure> {
        self.tag += 1;
        let tag = format!("e{}", self.tag);
        self.write(format!("{tag} {command}\r\n").as_bytes())
            .await?;
        Ok(tag)
    }

    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<(), ImapFailure> {
        let write = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        tokio::time::timeout(self.limits.request_timeout, write)
            .await
            .map_err(|_| ImapFailure::Unreachable("writing to the server timed out".into()))?
            .map_err(io_failure)
    }

    /// Starts IDLE; answers its tag once the server accepted it, with what came before.
    pub(crate) async fn idle(&mut self) -> Result<(String, Vec<Untagged>), ImapFailure> {
        let tag = self.send("IDLE").await?;
        let mut before = Vec::new();
        loop {
            match self.reply(self.limits.request_timeout).await? {
                Reply::Continue => return Ok((tag, before)),
                Reply::Untagged(Untagged::Bye(text)) => return Err(ImapFailure::Closed(text)),
                Reply::Untagged(u) => before.push(u),
                Reply::Tagged { tag: t, done } if t == tag => {
                    return Err(ImapFailure::Refused {
                        command: "IDLE".into(),
                        text: done.text,
                        limit: done.limit,
                    });
                }
                Reply::Tagged { .. } => {}
            }
        }
    }

    /// The next untagged answer during IDLE, or `None` when `wait` passed without one.
    pub(crate) async fn idle_news(
        &mut self,
        wait: Duration,
    ) -> Result<Option<Untagged>, ImapFailure> {
        match tokio::time::timeout(wait, self.reply(Duration::MAX)).await {
            Err(_) => Ok(None),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Reply::Untagged(Untagged::Bye(text)))) => Err(ImapFailure::Closed(text)),
            Ok(Ok(Reply::Untagged(u))) => Ok(Some(u)),
            Ok(Ok(_)) => Err(ImapFailure::Closed("IDLE ended by the server".into())),
        }
    }

    /// Ends IDLE; answers what came until the server confirmed.
    pub(crate) async fn idle_done(&mut self, tag: &str) -> Result<Vec<Untagged>, ImapFailure> {
        self.write(b"DONE\r\n").await?;
        let mut after = Vec::new();
        loop {
            match self.reply(self.limits.request_timeout).await? {
                Reply::Untagged(Untagged::Bye(text)) => return Err(ImapFailure::Closed(text)),
                Reply::Untagged(u) => after.push(u),
                Reply::Tagged { tag: t, .. } if t == tag => return Ok(after),
                _ => {}
            }
        }
    }

    /// Logs out, briefly; the connection closes either way.
    pub(crate) async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ok("LOGOUT")).await;
    }

    async fn read_more(&mut self, wait: Duration) -> Result<(), ImapFailure> {
        let read = self.io.read_buf(&mut self.buf);
        let n = if wait == Duration::MAX {
            read.await.map_err(io_failure)?
        } else {
            tokio::time::timeout(wait, read)
                .await
                .map_err(|_| ImapFailure::Unreachable(format!("no answer within {wait:?}")))?
                .map_err(io_failure)?
        };
        if n == 0 {
            return Err(ImapFailure::Closed("end of the connection".into()));
        }
        Ok(())
    }

    /// The next whole response, waiting at most `wait` for each read.
    async fn reply(&mut self, wait: Duration) -> Result<Reply, ImapFailure> {
        loop {
            match ResponseCodec::default().decode(&self.buf) {
                Ok((rest, response)) => {
                    let consumed = self.buf.len() - rest.len();
                    let reply = owned(response);
                    self.buf.drain(..consumed);
                    return Ok(reply);
                }
                Err(ResponseDecodeError::Incomplete)
                | Err(ResponseDecodeError::LiteralFound { .. }) => {
                    if oversized_literal(&self.buf, self.limits.max_body_bytes) {
                        return Err(ImapFailure::TooLarge {
                            limit: self.limits.max_body_bytes,
                        });
                    }
                }
                Err(ResponseDecodeError::Failed) => {
                    let line_end = self
                        .buf
                        .iter()
                        .position(|&b| b == b'\n')
                        .unwrap_or(self.buf.len())
                        .min(120);
                    return Err(ImapFailure::Malformed(format!(
                        "{:?}",
                        String::from_utf8_lossy(&self.buf[..line_end])
                    )));
                }
            }
            // A line with no literal is short: a server that sends an endless one is cut off.
            if self.buf.len() as u64 > self.limits.max_body_bytes + 64 * 1024 {
                return Err(ImapFailure::TooLarge {
                    limit: self.limits.max_body_bytes,
                });
            }
            self.read_more(wait).await?;
        }
    }
}

/// Whether the responses begun in `buf` announce a literal larger than `max` bytes. A literal
/// is announced at the end of a line (`{N}` or `{N+}`) and its bytes follow the line; a
/// quoted string cannot hold a line break, so a line's end is never inside one.
fn oversized_literal(buf: &[u8], max: u64) -> bool {
    let mut at = 0;
    while let Some(line_end) = buf[at..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[at..at + line_end];
        at += line_end + 2;
        let Some(open) = line
            .ends_with(b"}")
            .then(|| line.iter().rposition(|&b| b == b'{'))
            .flatten()
        else {
            continue;
        };
        let digits = &line[open + 1..line.len() - 1];
        let digits = digits.strip_suffix(b"+").unwrap_or(digits);
        let Some(length) = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<u64>().ok())
        else {
            continue;
        };
        if length > max {
            return true;
        }
        // Past the literal's bytes, to the rest of the response.
        match usize::try_from(length).ok().and_then(|n| at.checked_add(n)) {
            Some(next) if next <= buf.len() => at = next,
            _ => return false,
        }
    }
    false
}

fn text_of(n: &NString<'_>) -> Option<Vec<u8>> {
    n.0.as_ref().map(|s| s.as_ref().to_vec())
}

fn mailbox_name(m: &Mailbox<'_>) -> String {
    match m {
        Mailbox::Inbox => "INBOX".to_owned(),
        Mailbox::Other(other) => String::from_utf8_lossy(other.as_ref()).into_owned(),
    }
}

fn done(code: Option<&Code<'_>>, text: &str, ok: bool) -> Done {
    let capabilities = match code {
        Some(Code::Capability(caps)) => Some(capability_names(caps.as_ref())),
        _ => None,
    };
    let code = code
        .filter(|_| capabilities.is_none())
        .map(|c| format!("{c:?}").to_ascii_uppercase());
    let says = |word: &str| code.as_deref().is_some_and(|c| c.contains(word));
    Done {
        ok,
        text: text.to_owned(),
        limit: says("LIMIT"),
        temporary: says("UNAVAILABLE") || says("SERVERBUG"),
        capabilities,
    }
}

fn capability_names(caps: &[imap_codec::imap_types::response::Capability<'_>]) -> Vec<String> {
    caps.iter()
        .map(|c| c.to_string().to_ascii_uppercase())
        .collect()
}

fn status_code(code: Option<&Code<'_>>) -> Untagged {
    match code {
        Some(Code::UidValidity(v)) => Untagged::UidValidity(v.get()),
        Some(Code::UidNext(n)) => Untagged::UidNext(n.get()),
        Some(Code::Capability(caps)) => Untagged::Capabilities(capability_names(caps.as_ref())),
        _ => Untagged::Other,
    }
}

/// What a decoded response says, in owned values.
fn owned(response: Response<'_>) -> Reply {
    match response {
        Response::CommandContinuationRequest(_) => Reply::Continue,
        Response::Status(status) => match status {
            Status::Ok {
                tag: Some(tag),
                code,
                text,
            } => Reply::Tagged {
                tag: tag.as_ref().to_owned(),
                done: done(code.as_ref(), text.as_ref(), true),
            },
            Status::No {
                tag: Some(tag),
                code,
                text,
            }
            | Status::Bad {
                tag: Some(tag),
                code,
                text,
            } => Reply::Tagged {
                tag: tag.as_ref().to_owned(),
                done: done(code.as_ref(), text.as_ref(), false),
            },
            Status::Ok { code, .. } | Status::No { code, .. } | Status::Bad { code, .. } => {
                Reply::Untagged(status_code(code.as_ref()))
            }
            Status::Bye { text, .. } => Reply::Untagged(Untagged::Bye(text.as_ref().to_owned())),
        },
        Response::Data(data) => Reply::Untagged(match data {
            Data::Exists(n) => Untagged::Exists(n),
            Data::Search(uids) => Untagged::Search(uids.into_iter().map(|u| u.get()).collect()),
            Data::Capability(caps) => Untagged::Capabilities(capability_names(caps.as_ref())),
            Data::List {
                items,
                delimiter,
                mailbox,
            } => Untagged::List {
                name: mailbox_name(&mailbox),
                delimiter: delimiter.map(|d| d.inner()),
                attributes: items.iter().map(|a| a.to_string()).collect(),
            },
            Data::Status { mailbox, items } => {
                let mut uid_next = None;
                let mut uid_validity = None;
                for item in items.iter() {
                    match item {
                        StatusDataItem::UidNext(n) => uid_next = Some(n.get()),
                        StatusDataItem::UidValidity(v) => uid_validity = Some(v.get()),
                        _ => {}
                    }
                }
                Untagged::Status {
                    mailbox: mailbox_name(&mailbox),
                    uid_next,
                    uid_validity,
                }
            }
            Data::Fetch { items, .. } => {
                let mut uid = None;
                let mut body = None;
                let mut received_unix_ms = None;
                for item in items.as_ref() {
                    match item {
                        MessageDataItem::Uid(u) => uid = Some(u.get()),
                        MessageDataItem::InternalDate(d) => {
                            received_unix_ms = Some(d.as_ref().timestamp_millis())
                        }
                        MessageDataItem::BodyExt { data, .. } | MessageDataItem::Rfc822(data) => {
                            body = text_of(data)
                        }
                        _ => {}
                    }
                }
                Untagged::Fetch {
                    uid,
                    body,
                    received_unix_ms,
                }
            }
            _ => Untagged::Other,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protocol::{Disposition, ServerFailure};

    fn decode_all(mut bytes: &[u8]) -> Vec<Untagged> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (rest, r) = ResponseCodec::default()
                .decode(bytes)
                .expect("whole responses");
            if let Reply::Untagged(u) = owned(r) {
                out.push(u);
            }
            bytes = rest;
        }
        out
    }

    #[test]
    fn fetch_list_status_and_codes_read_as_owned_values() {
        let got = decode_all(
            b"* 3 FETCH (UID 42 INTERNALDATE \"07-Dec-2026 08:00:00 +0000\" BODY[] {10}\r\nHello\r\nBye)\r\n\
              * LIST (\\HasNoChildren \\Sent) \".\" \"Sent Items\"\r\n\
              * LIST () \"/\" INBOX\r\n\
              * STATUS \"Sent Items\" (UIDNEXT 7 UIDVALIDITY 99)\r\n\
              * OK [UIDVALIDITY 1796625544] UIDs valid\r\n\
              * OK [UIDNEXT 12] Predicted next UID\r\n\
              * SEARCH 4 9 12\r\n\
              * 5 EXISTS\r\n",
        );
        assert_eq!(
            got,
            vec![
                Untagged::Fetch {
                    uid: Some(42),
                    body: Some(b"Hello\r\nBye".to_vec()),
                    received_unix_ms: Some(1_796_630_400_000),
                },
                Untagged::List {
                    name: "Sent Items".into(),
                    delimiter: Some('.'),
                    attributes: vec!["\\HasNoChildren".into(), "\\Sent".into()],
                },
                Untagged::List {
                    name: "INBOX".into(),
                    delimiter: Some('/'),
                    attributes: vec![],
                },
                Untagged::Status {
                    mailbox: "Sent Items".into(),
                    uid_next: Some(7),
                    uid_validity: Some(99),
                },
                Untagged::UidValidity(1_796_625_544),
                Untagged::UidNext(12),
                Untagged::Search(vec![4, 9, 12]),
                Untagged::Exists(5),
            ]
        );
    }

    #[test]
    fn a_response_reads_the_same_however_it_is_cut() {
        let whole: &[u8] =
            b"* 1 FETCH (UID 7 BODY[] {24}\r\nSubject: x\r\n\r\nbody {3}\r\n)\r\ne1 OK done\r\n";
        for cut in 0..whole.len() {
            // The first part alone never decodes to something else.
            let first = ResponseCodec::default().decode(&whole[..cut]);
            if let Ok((rest, r)) = first {
                let consumed = cut - rest.len();
                assert_eq!(
                    owned(r).untagged(),
                    owned(ResponseCodec::default().decode(whole).unwrap().1).untagged(),
                    "cut at {cut}"
                );
                assert!(consumed <= cut);
            }
        }
        let mut bytes = whole;
        let (rest, first) = ResponseCodec::default().decode(bytes).unwrap();
        assert_eq!(
            owned(first).untagged(),
            Some(Untagged::Fetch {
                uid: Some(7),
                body: Some(b"Subject: x\r\n\r\nbody {3}\r\n".to_vec()),
                received_unix_ms: None,
            })
        );
        bytes = rest;
        assert!(matches!(
            owned(ResponseCodec::default().decode(bytes).unwrap().1),
            Reply::Tagged { ref tag, done: Done { ok: true, .. } } if tag == "e1"
        ));
    }

    #[test]
    fn a_literal_is_measured_where_it_is_announced_and_its_bytes_are_not_read_as_lines() {
        let max = 100;
        assert!(oversized_literal(b"* 1 FETCH (BODY[] {101}\r\nFrom", max));
        assert!(oversized_literal(
            b"* 1 FETCH (BODY[] {9999999999999}\r\n",
            max
        ));
        assert!(!oversized_literal(b"* 1 FETCH (BODY[] {100}\r\nFrom", max));
        // A mail whose text announces a large literal is only text.
        assert!(!oversized_literal(
            b"* 1 FETCH (BODY[] {22}\r\nsee {99999999}\r\nthere UID 4)\r\n",
            max
        ));
        // After a literal, the next one counts.
        assert!(oversized_literal(
            b"* 1 FETCH (BODY[1] {3}\r\nabc BODY[2] {500}\r\n",
            max
        ));
    }

    #[test]
    fn names_and_passwords_are_quoted_and_line_breaks_refused() {
        assert_eq!(quoted("Sent Items").unwrap(), "\"Sent Items\"");
        assert_eq!(quoted(r#"a"b\c"#).unwrap(), r#""a\"b\\c""#);
        assert!(quoted("a\r\nb").is_err());
    }

    /// A server scripted line by line over an in-memory pipe: it reads each command, and
    /// writes what the test says for it (`{tag}` stands for the command's tag).
    async fn scripted(
        greeting: &str,
        answers: Vec<impl Into<String>>,
    ) -> Result<Session, ImapFailure> {
        let alice = Login::Password {
            user: "alice".into(),
            password: Secret::new("secret".into()),
        };
        scripted_as(alice, greeting, answers).await.0
    }

    /// As [`scripted`], logging in as `login`; answers the lines the server read besides.
    async fn scripted_as(
        login: Login,
        greeting: &str,
        answers: Vec<impl Into<String>>,
    ) -> (
        Result<Session, ImapFailure>,
        Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        use tokio::io::AsyncBufReadExt as _;
        let (client, server) = tokio::io::duplex(1 << 16);
        let greeting = greeting.to_owned();
        let answers: Vec<String> = answers.into_iter().map(Into::into).collect();
        let read_lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = read_lines.clone();
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(server);
            let mut lines = tokio::io::BufReader::new(read).lines();
            if !greeting.is_empty() {
                let _ = write.write_all(greeting.as_bytes()).await;
            }
            for answer in answers {
                let Ok(Some(line)) = lines.next_line().await else {
                    return;
                };
                log.lock().unwrap().push(line.clone());
                let tag = line.split(' ').next().unwrap_or_default().to_owned();
                let _ = write
                    .write_all(answer.replace("{tag}", &tag).as_bytes())
                    .await;
            }
            // Then silence, the connection held open.
            std::future::pending::<()>().await;
        });
        let endpoint = Endpoint {
            host: "imap.test".into(),
            port: 143,
            security: Security::None,
        };
        let tls = super::super::trusting_no_one();
        let limits = Limits {
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
        };
        let session = Session::over(Box::new(client), &endpoint, &login, &tls, limits).await;
        (session, read_lines)
    }

    const GREETING: &str = "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN IDLE] ready\r\n";
    const LOGGED_IN: &str = "{tag} OK [CAPABILITY IMAP4rev1 IDLE NOTIFY] Logged in\r\n";

    #[tokio::test(start_paused = true)]
    async fn a_greeting_that_never_comes_is_given_up_after_the_request_timeout() {
        let started = tokio::time::Instant::now();
        let err = scripted("", Vec::<&str>::new()).await.unwrap_err();
        assert!(matches!(err, ImapFailure::Unreachable(_)), "{err:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_refused_login_is_rejected_credentials_and_a_limit_is_waited_out() {
        let err = scripted(
            GREETING,
            vec!["{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"],
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ImapFailure::Rejected(_)), "{err:?}");
        assert!(ServerFailure::credentials_rejected(&err));
        let err = scripted(GREETING, vec!["{tag} NO [LIMIT] Too many connections\r\n"])
            .await
            .unwrap_err();
        assert_eq!(
            err.disposition(),
            Disposition::Retry {
                after: Some(Duration::from_secs(60))
            },
            "{err:?}"
        );
        let err = scripted(
            GREETING,
            vec!["{tag} NO [UNAVAILABLE] Temporary authentication failure.\r\n"],
        )
        .await
        .unwrap_err();
        assert!(!ServerFailure::credentials_rejected(&err), "{err:?}");
        assert_eq!(err.disposition(), Disposition::Retry { after: None });
    }

    #[tokio::test]
    async fn a_literal_over_the_limit_fails_before_it_is_read() {
        let mut s = scripted(
            GREETING,
            vec![
                LOGGED_IN,
                "* 1 FETCH (UID 1 BODY[] {1073741824}\r\nFrom: a\r\n",
            ],
        )
        .await
        .unwrap();
        let err = s.ok("UID FETCH 1 (UID BODY.PEEK[])").await.unwrap_err();
        assert!(
            matches!(err, ImapFailure::TooLarge { limit } if limit == 1 << 20),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_literal_that_comes_over_many_reads_is_read_whole() {
        // Far more than one read of the pipe (64 KiB) holds.
        let mime = format!("Subject: big\r\n\r\n{}\r\n", "y".repeat(300_000));
        let answer = format!(
            "* 1 FETCH (UID 7 BODY[] {{{}}}\r\n{mime})\r\n{{tag}} OK Fetch completed\r\n",
            mime.len()
        );
        let mut s = scripted(GREETING, vec![LOGGED_IN.to_owned(), answer])
            .await
            .unwrap();
        let answers = s.ok("UID FETCH 7 (UID BODY.PEEK[])").await.unwrap();
        assert!(
            matches!(&answers[..], [Untagged::Fetch { uid: Some(7), body: Some(b), .. }] if *b == mime.as_bytes()),
            "{:?}",
            answers.len()
        );
    }

    #[tokio::test]
    async fn an_access_token_goes_as_xoauth2_or_where_only_that_is_offered_as_oauthbearer() {
        let token = || Login::Token {
            user: "alice@contoso.com".into(),
            token: Secret::new("tok".into()),
        };
        let sent = |lines: &Arc<std::sync::Mutex<Vec<String>>>| {
            let line = lines.lock().unwrap()[0].clone();
            let (command, initial) = line.rsplit_once(' ').unwrap();
            let raw = base64::engine::general_purpose::STANDARD
                .decode(initial)
                .unwrap();
            (command.to_owned(), String::from_utf8(raw).unwrap())
        };
        for (offered, mechanism, initial) in [
            (
                "AUTH=XOAUTH2 AUTH=OAUTHBEARER",
                "XOAUTH2",
                "user=alice@contoso.com\x01auth=Bearer tok\x01\x01",
            ),
            (
                "AUTH=OAUTHBEARER",
                "OAUTHBEARER",
                "n,a=alice@contoso.com,\x01auth=Bearer tok\x01\x01",
            ),
        ] {
            let greeting = format!("* OK [CAPABILITY IMAP4rev1 SASL-IR {offered}] ready\r\n");
            let (s, lines) = scripted_as(token(), &greeting, vec![LOGGED_IN]).await;
            assert!(s.is_ok(), "{s:?}");
            assert_eq!(
                sent(&lines),
                (format!("e1 AUTHENTICATE {mechanism}"), initial.to_owned())
            );
        }
    }

    #[tokio::test]
    async fn a_bye_in_the_middle_of_idle_closes_the_watch() {
        let mut s = scripted(
            GREETING,
            vec![LOGGED_IN, "+ idling\r\n* BYE Server shutting down\r\n"],
        )
        .await
        .unwrap();
        // What the server offers after the login is what its login answer announced.
        assert!(s.has("NOTIFY"));
        let (_tag, before) = s.idle().await.unwrap();
        assert!(before.is_empty());
        let err = s.idle_news(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, ImapFailure::Closed(ref why) if why.contains("shutting down")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_server_without_sasl_ir_is_answered_on_its_challenge_and_one_without_plain_gets_login()
     {
        // AUTHENTICATE PLAIN, then the initial response on the server's "+".
        let s = scripted(
            "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n",
            // The answer to the initial response: its line carries no tag, the login's is e1.
            // No capabilities with the login's answer: asked for (e2).
            vec![
                "+ \r\n",
                "e1 OK Logged in\r\n",
                "* CAPABILITY IMAP4rev1 IDLE NOTIFY\r\ne2 OK Capability completed\r\n",
            ],
        )
        .await;
        assert!(s.as_ref().is_ok_and(|s| s.has("NOTIFY")), "{s:?}");
        let s = scripted("* OK [CAPABILITY IMAP4rev1] ready\r\n", vec![LOGGED_IN]).await;
        assert!(s.is_ok(), "{s:?}");
        let err = scripted(
            "* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready\r\n",
            Vec::<&str>::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ImapFailure::Config(_)), "{err:?}");
    }

    impl Reply {
        fn untagged(self) -> Option<Untagged> {
            match self {
                Reply::Untagged(u) => Some(u),
                _ => None,
            }
        }
    }
}
