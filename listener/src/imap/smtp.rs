//! Submission over SMTP (RFC 5321, 6409): an IMAP mailbox's mail goes out through the SMTP
//! server its send call names, over implicit TLS or STARTTLS, logged in with the mailbox's
//! credentials (AUTH PLAIN, LOGIN, or XOAUTH2 with an access token).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::session::{Endpoint, Io, Login, Security, wrap_tls};
use crate::creatio::outgoing::Submission;
use crate::engine::protocol::{Disposition, Failure, Limits, ServerFailure, error_chain};

/// Why a mail did not go out. Displays carry no secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SmtpFailure {
    #[error("the SMTP server rejected the credentials: {0}")]
    Rejected(String),
    #[error("SMTP server unreachable: {0}")]
    Unreachable(String),
    /// The server answered 4xx or 5xx; `permanent` for 5xx.
    #[error("the SMTP server refused {stage}: {reply}")]
    Refused {
        stage: &'static str,
        reply: String,
        permanent: bool,
    },
    /// The connection failed after the mail's text was handed over: it may have gone out.
    #[error("the SMTP server's answer to the mail was lost: {0}")]
    InDoubt(String),
    #[error("{0}")]
    Config(String),
}

impl ServerFailure for SmtpFailure {
    fn disposition(&self) -> Disposition {
        match self {
            SmtpFailure::Rejected(_) | SmtpFailure::Config(_) => Disposition::Fatal,
            SmtpFailure::Refused {
                permanent: true, ..
            } => Disposition::Fatal,
            _ => Disposition::Retry { after: None },
        }
    }

    fn sentence(&self) -> String {
        match self {
            SmtpFailure::Rejected(_) => {
                "Invalid credentials: the SMTP server rejected the user name or password".into()
            }
            SmtpFailure::Unreachable(why) if why.contains("certificate") => {
                "The SMTP server's TLS certificate is not trusted; give its CA to the listener with --imap-ca-file"
                    .into()
            }
            SmtpFailure::Unreachable(_) => {
                "The SMTP server could not be reached at ServiceUrl and Port".into()
            }
            SmtpFailure::Refused { stage, reply, .. } => {
                format!("The SMTP server refused {stage}: {reply}")
            }
            SmtpFailure::InDoubt(_) => {
                "The SMTP server's answer was lost; the message may have been sent".into()
            }
            SmtpFailure::Config(why) => why.clone(),
        }
    }

    fn class_name(&self) -> &'static str {
        match self {
            SmtpFailure::Rejected(_) => "SmtpAuthenticationFailed",
            SmtpFailure::Unreachable(_) => "SmtpUnreachable",
            SmtpFailure::Refused { .. } => "SmtpRefused",
            SmtpFailure::InDoubt(_) => "SmtpAnswerLost",
            SmtpFailure::Config(_) => "SmtpConfiguration",
        }
    }

    fn credentials_rejected(&self) -> bool {
        matches!(self, SmtpFailure::Rejected(_))
    }

    fn send_in_doubt(&self) -> bool {
        matches!(self, SmtpFailure::InDoubt(_))
    }

    fn send_refused(&self) -> bool {
        matches!(self, SmtpFailure::Refused { .. })
    }

    fn unsent_sentence(&self) -> String {
        match self {
            SmtpFailure::Refused { stage, reply, .. } => {
                format!("The mail server refused {stage}: {reply}")
            }
            SmtpFailure::Unreachable(_) => {
                "The SMTP server could not be reached at ServiceUrl and Port; the message was not sent"
                    .into()
            }
            SmtpFailure::Rejected(_) => {
                "The SMTP server rejected the user name or password of the sending mailbox".into()
            }
            other => other.sentence(),
        }
    }
}

impl From<SmtpFailure> for Failure {
    fn from(f: SmtpFailure) -> Failure {
        Failure::server(f)
    }
}

fn io_failure(e: std::io::Error) -> SmtpFailure {
    SmtpFailure::Unreachable(error_chain(&e))
}

/// The ports SMTP submission uses when `Port` is 0.
pub(crate) fn default_port(security: Security) -> u16 {
    match security {
        Security::Tls | Security::Auto => 465,
        Security::StartTls => 587,
        Security::None => 25,
    }
}

/// A reply: its code and its text, lines joined.
struct Reply {
    code: u16,
    text: String,
}

struct Conversation {
    io: BufReader<Box<dyn Io>>,
    wait: Duration,
}

impl Conversation {
    async fn reply(&mut self) -> Result<Reply, SmtpFailure> {
        let mut text = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(self.wait, self.io.read_line(&mut line))
                .await
                .map_err(|_| SmtpFailure::Unreachable(format!("no answer within {:?}", self.wait)))?
                .map_err(io_failure)?;
            if n == 0 {
                return Err(SmtpFailure::Unreachable("end of the connection".into()));
            }
            let line = line.trim_end();
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| SmtpFailure::Unreachable(format!("not an SMTP answer: {line:?}")))?;
            text.push(line.get(4..).unwrap_or_default().to_owned());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply {
                    code,
                    text: text.join(" "),
                });
            }
            if text.len() > 1000 {
                return Err(SmtpFailure::Unreachable("an endless answer".into()));
            }
        }
    }

    async fn send(&mut self, line: &str) -> Result<(), SmtpFailure> {
        self.send_bytes(line.as_bytes()).await
    }

    async fn send_bytes(&mut self, line: &[u8]) -> Result<(), SmtpFailure> {
        let write = async {
            let io = self.io.get_mut();
            io.write_all(line).await?;
            io.write_all(b"\r\n").await?;
            io.flush().await
        };
        tokio::time::timeout(self.wait, write)
            .await
            .map_err(|_| SmtpFailure::Unreachable("writing timed out".into()))?
            .map_err(io_failure)
    }

    /// Sends a command and wants a reply of class `class` (2 or 3).
    async fn expect(
        &mut self,
        line: &str,
        class: u16,
        stage: &'static str,
    ) -> Result<Reply, SmtpFailure> {
        self.send(line).await?;
        let reply = self.reply().await?;
        if reply.code / 100 == class {
            return Ok(reply);
        }
        Err(SmtpFailure::Refused {
            stage,
            reply: format!("{} {}", reply.code, reply.text),
            permanent: reply.code >= 500,
        })
    }

    /// EHLO; answers the extensions (upper case).
    async fn hello(&mut self) -> Result<Vec<String>, SmtpFailure> {
        let reply = self.expect("EHLO exchange-listener", 2, "EHLO").await?;
        Ok(reply.text.split(' ').map(str::to_ascii_uppercase).collect())
    }
}

/// Hands `submission` to the SMTP server at `endpoint`.
pub(crate) async fn submit(
    endpoint: &Endpoint,
    login: &Login,
    tls: &Arc<rustls::ClientConfig>,
    limits: Limits,
    submission: &Submission,
) -> Result<(), SmtpFailure> {
    let address = (endpoint.host.as_str(), endpoint.port);
    let tcp = tokio::time::timeout(limits.request_timeout, TcpStream::connect(address))
        .await
        .map_err(|_| SmtpFailure::Unreachable("connecting timed out".into()))?
        .map_err(io_failure)?;
    let implicit = match endpoint.security {
        Security::Tls => true,
        Security::Auto => endpoint.port == 465,
        Security::None | Security::StartTls => false,
    };
    let tls_failure = |e: super::failure::ImapFailure| SmtpFailure::Unreachable(e.to_string());
    let io: Box<dyn Io> = if implicit {
        Box::new(
            wrap_tls(Box::new(tcp), &endpoint.host, tls, limits)
                .await
                .map_err(tls_failure)?,
        )
    } else {
        Box::new(tcp)
    };
    let mut c = Conversation {
        io: BufReader::new(io),
        wait: limits.request_timeout,
    };
    let greeting = c.reply().await?;
    if greeting.code != 220 {
        return Err(SmtpFailure::Refused {
            stage: "the connection",
            reply: format!("{} {}", greeting.code, greeting.text),
            permanent: greeting.code >= 500,
        });
    }
    let mut extensions = c.hello().await?;
    if !implicit && endpoint.security != Security::None {
        if !extensions.iter().any(|e| e == "STARTTLS") {
            return Err(SmtpFailure::Config(
                "the SMTP server offers no TLS on this port (no STARTTLS); use port 465 with SSL, or SecureOption None to send the password in plain text"
                    .into(),
            ));
        }
        c.expect("STARTTLS", 2, "STARTTLS").await?;
        let plain = c.io.into_inner();
        let secured = wrap_tls(plain, &endpoint.host, tls, limits)
            .await
            .map_err(tls_failure)?;
        c = Conversation {
            io: BufReader::new(Box::new(secured)),
            wait: limits.request_timeout,
        };
        extensions = c.hello().await?;
    }
    let offers = |mechanism: &str| extensions.iter().any(|e| e == mechanism);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let auth = match login {
        Login::Token { user, token } => {
            format!(
                "AUTH XOAUTH2 {}",
                b64(&format!(
                    "user={user}\x01auth=Bearer {}\x01\x01",
                    token.expose()
                ))
            )
        }
        Login::Password { user, password } if offers("PLAIN") || !offers("LOGIN") => {
            format!(
                "AUTH PLAIN {}",
                b64(&format!("\0{user}\0{}", password.expose()))
            )
        }
        Login::Password { user, .. } => {
            c.expect("AUTH LOGIN", 3, "the login").await?;
            c.expect(&b64(user), 3, "the login").await?;
            String::new()
        }
    };
    let done = if auth.is_empty() {
        let Login::Password { password, .. } = login else {
            unreachable!("LOGIN is chosen for passwords alone")
        };
        c.send(&b64(password.expose())).await?;
        c.reply().await?
    } else {
        c.send(&auth).await?;
        let reply = c.reply().await?;
        if reply.code == 334 {
            // XOAUTH2's error challenge: an empty line ends the exchange.
            c.send("").await?;
            c.reply().await?
        } else {
            reply
        }
    };
    if done.code != 235 {
        return Err(if done.code == 535 || done.code == 534 {
            SmtpFailure::Rejected(format!("{} {}", done.code, done.text))
        } else {
            SmtpFailure::Refused {
                stage: "the login",
                reply: format!("{} {}", done.code, done.text),
                permanent: done.code >= 500,
            }
        });
    }
    c.expect(&format!("MAIL FROM:<{}>", submission.from), 2, "the sender")
        .await?;
    for rcpt in &submission.recipients {
        c.expect(&format!("RCPT TO:<{rcpt}>"), 2, "a recipient")
            .await?;
    }
    c.expect("DATA", 3, "the message").await?;
    // The text, its lines dot-stuffed, then the end; from here a lost answer leaves the mail
    // in doubt.
    let mut data = Vec::with_capacity(submission.message.len() + 1024);
    for line in submission.message.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            data.push(b'.');
        }
        data.extend_from_slice(line);
    }
    if !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(b".");
    let in_doubt = |e: SmtpFailure| match e {
        SmtpFailure::Unreachable(why) => SmtpFailure::InDoubt(why),
        other => other,
    };
    c.send_bytes(&data).await.map_err(in_doubt)?;
    let accepted = c.reply().await.map_err(in_doubt)?;
    if accepted.code / 100 != 2 {
        return Err(SmtpFailure::Refused {
            stage: "the message",
            reply: format!("{} {}", accepted.code, accepted.text),
            permanent: accepted.code >= 500,
        });
    }
    let _ = c.send("QUIT").await;
    Ok(())
}
