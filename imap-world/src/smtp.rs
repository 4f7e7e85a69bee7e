//! A small SMTP server for tests and scenarios: it takes submissions (EHLO, AUTH PLAIN or LOGIN
//! against its users, MAIL, RCPT, DATA) on a loopback port and hands each mail to Dovecot for
//! every recipient that lives there, as a mail system delivers what it accepted.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

use crate::Dovecot;

/// A mail the server accepted: its envelope and text.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub from: String,
    pub to: Vec<String>,
    pub message: String,
}

pub struct SmtpSink {
    pub port: u16,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpSink {
    /// Serves until dropped; `users` (address, password) may log in; mail for one of
    /// `mailboxes` (addresses Dovecot serves) goes to its inbox there.
    pub async fn start(
        users: &[(&str, &str)],
        mailboxes: &[&str],
        dovecot: Arc<Dovecot>,
    ) -> anyhow::Result<SmtpSink> {
        let mailboxes: Vec<String> = mailboxes.iter().map(|m| m.to_string()).collect();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let users: Vec<(String, String)> = users
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
        let accepted: Arc<Mutex<Vec<Accepted>>> = Arc::default();
        let log = accepted.clone();
        let task = tokio::spawn(async move {
            let mailboxes = mailboxes;
            while let Ok((socket, _)) = listener.accept().await {
                let users = users.clone();
                let mailboxes = mailboxes.clone();
                let log = log.clone();
                let dovecot = dovecot.clone();
                tokio::spawn(async move {
                    let _ = serve(socket, &users, &mailboxes, &log, &dovecot).await;
                });
            }
        });
        Ok(SmtpSink {
            port,
            accepted,
            task,
        })
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    socket: tokio::net::TcpStream,
    users: &[(String, String)],
    mailboxes: &[String],
    log: &Mutex<Vec<Accepted>>,
    dovecot: &Dovecot,
) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read);
    let b64 = base64::engine::general_purpose::STANDARD;
    write.write_all(b"220 sink.test ESMTP ready\r\n").await?;
    let mut logged_in = false;
    let mut from = String::new();
    let mut to: Vec<String> = Vec::new();
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let line = line.trim_end().to_owned();
        let upper = line.to_ascii_uppercase();
        let answer: String = if upper.starts_with("EHLO") {
            "250-sink.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME".into()
        } else if let Some(initial) = line.strip_prefix("AUTH PLAIN ") {
            let decoded = b64.decode(initial).unwrap_or_default();
            let parts: Vec<String> = decoded
                .split(|&b| b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            logged_in =
                parts.len() == 3 && users.iter().any(|(u, p)| *u == parts[1] && *p == parts[2]);
            if logged_in {
                "235 2.7.0 Authenticated".into()
            } else {
                "535 5.7.8 Authentication credentials invalid".into()
            }
        } else if upper.starts_with("MAIL FROM:") && !logged_in {
            "530 5.7.0 Authentication required".into()
        } else if upper.starts_with("MAIL FROM:") {
            from = line[10..].trim_matches(['<', '>', ' ']).to_owned();
            to.clear();
            "250 2.1.0 Ok".into()
        } else if upper.starts_with("RCPT TO:") {
            to.push(line[8..].trim_matches(['<', '>', ' ']).to_owned());
            "250 2.1.5 Ok".into()
        } else if upper == "DATA" {
            write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            let mut message = String::new();
            loop {
                let mut l = String::new();
                if lines.read_line(&mut l).await? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" {
                    break;
                }
                message.push_str(l.strip_prefix('.').unwrap_or(&l));
            }
            for rcpt in &to {
                if mailboxes.contains(rcpt)
                    && let Err(e) = dovecot.deliver_to(rcpt, "INBOX", &message).await
                {
                    return Err(std::io::Error::other(e.to_string()));
                }
            }
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Accepted {
                    from: from.clone(),
                    to: to.clone(),
                    message,
                });
            "250 2.0.0 Ok: queued".into()
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 Command not recognized".into()
        };
        write.write_all(format!("{answer}\r\n").as_bytes()).await?;
    }
}
