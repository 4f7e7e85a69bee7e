//! A small IMAP server played by the tests over loopback TCP, for what Dovecot will not do on
//! request: no IDLE, a UIDVALIDITY that changes, a BYE in the middle of IDLE. One folder
//! (INBOX); every command is logged, and the test moves the folder on between them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::connection::Connection;
use super::session::{Endpoint, Login, Security};
use super::{ImapMailbox, trusting_no_one};
use crate::creatio::contract::Secret;
use crate::engine::protocol::Limits;

#[derive(Default)]
pub(super) struct Script {
    /// Whether the server offers IDLE.
    pub idle: bool,
    pub validity: AtomicU32,
    /// The next UID: mail 1 .. uid_next-1 is in the folder.
    pub uid_next: AtomicU32,
    /// Every command line as it came, without its tag.
    pub log: Mutex<Vec<String>>,
    /// Connections accepted.
    pub accepted: AtomicUsize,
    /// Rung by the test: a connection in IDLE says what changed.
    pub poke: Notify,
    /// With `poke`: say BYE instead of the news.
    pub bye: AtomicBool,
}

impl Script {
    pub fn new(idle: bool) -> Arc<Script> {
        Arc::new(Script {
            idle,
            validity: AtomicU32::new(7),
            uid_next: AtomicU32::new(1),
            ..Script::default()
        })
    }

    pub fn commands(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// A new mail in the folder; a connection in IDLE hears of it.
    pub fn arrive(&self) -> u32 {
        let uid = self.uid_next.fetch_add(1, Ordering::SeqCst);
        self.poke.notify_waiters();
        uid
    }

    /// Starts serving on 127.0.0.1; answers its port.
    pub async fn serve(self: &Arc<Script>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = self.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                script.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script.clone().session(tcp));
            }
        });
        port
    }

    async fn session(self: Arc<Script>, tcp: tokio::net::TcpStream) {
        let (read, mut write) = tcp.into_split();
        let mut lines = BufReader::new(read).lines();
        let capabilities = if self.idle {
            "IMAP4rev1 SASL-IR AUTH=PLAIN IDLE"
        } else {
            "IMAP4rev1 SASL-IR AUTH=PLAIN"
        };
        let greeting = format!("* OK [CAPABILITY {capabilities}] ready\r\n");
        if write.write_all(greeting.as_bytes()).await.is_err() {
            return;
        }
        while let Ok(Some(line)) = lines.next_line().await {
            let (tag, command) = line.split_once(' ').unwrap_or((&line, ""));
            self.log.lock().unwrap().push(command.to_owned());
            let verb = command
                .split(' ')
                .take(if command.starts_with("UID ") { 2 } else { 1 })
                .collect::<Vec<_>>()
                .join(" ")
                .to_ascii_uppercase();
            let validity = self.validity.load(Ordering::SeqCst);
            let next = self.uid_next.load(Ordering::SeqCst);
            let answer = match verb.as_str() {
                "AUTHENTICATE" | "LOGIN" => {
                    format!("{tag} OK [CAPABILITY {capabilities}] Logged in\r\n")
                }
                "EXAMINE" | "SELECT" => format!(
                    "* {} EXISTS\r\n* OK [UIDVALIDITY {validity}] UIDs valid\r\n\
                     * OK [UIDNEXT {next}] Predicted next UID\r\n{tag} OK [READ-ONLY] Examined\r\n",
                    next - 1
                ),
                "STATUS" => format!(
                    "* STATUS INBOX (UIDNEXT {next} UIDVALIDITY {validity})\r\n{tag} OK Status\r\n"
                ),
                "UID SEARCH" => {
                    // `UID SEARCH UID n:*` or `ALL`: the UIDs from n.
                    let from = command
                        .rsplit(' ')
                        .next()
                        .and_then(|r| r.strip_suffix(":*"))
                        .and_then(|n| n.parse::<u32>().ok())
                        .unwrap_or(1);
                    let uids: String = (from.max(1)..next).map(|u| format!(" {u}")).collect();
                    format!("* SEARCH{uids}\r\n{tag} OK Search\r\n")
                }
                "UID FETCH" => {
                    let set = command.split(' ').nth(2).unwrap_or_default();
                    let mut out = String::new();
                    for uid in set.split(',').filter_map(|u| u.parse::<u32>().ok()) {
                        let mime = format!(
                            "Message-ID: <{uid}@scripted.test>\r\nSubject: {uid}\r\n\r\nHello\r\n"
                        );
                        out += &format!(
                            "* {uid} FETCH (UID {uid} BODY[] {{{}}}\r\n{mime})\r\n",
                            mime.len()
                        );
                    }
                    out + &format!("{tag} OK Fetch\r\n")
                }
                "IDLE" if self.idle => {
                    if write.write_all(b"+ idling\r\n").await.is_err() {
                        return;
                    }
                    loop {
                        tokio::select! {
                            line = lines.next_line() => {
                                match line {
                                    Ok(Some(done)) if done.eq_ignore_ascii_case("DONE") => {
                                        self.log.lock().unwrap().push(done);
                                        break;
                                    }
                                    _ => return,
                                }
                            }
                            () = self.poke.notified() => {
                                let news = if self.bye.load(Ordering::SeqCst) {
                                    "* BYE Shutting down\r\n".to_owned()
                                } else {
                                    format!("* {} EXISTS\r\n", self.uid_next.load(Ordering::SeqCst) - 1)
                                };
                                if write.write_all(news.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    format!("{tag} OK Idle completed\r\n")
                }
                "LOGOUT" => format!("* BYE Logging out\r\n{tag} OK Logout\r\n"),
                _ => format!("{tag} BAD Unknown command\r\n"),
            };
            if write.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// An IMAP mailbox on the scripted server at `port`, looking at its folders every `wake`.
pub(super) fn mailbox(port: u16, wake: Duration) -> ImapMailbox {
    let endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port,
        security: Security::None,
    };
    let login = Login::Password {
        user: "alice".into(),
        password: Secret::new("secret".into()),
    };
    let limits = Limits {
        request_timeout: Duration::from_secs(10),
        max_body_bytes: 1 << 20,
    };
    ImapMailbox {
        connection: Arc::new(Connection::new(
            endpoint.clone(),
            login,
            trusting_no_one(),
            limits,
            &super::Slots::new(8),
        )),
        smtp: endpoint,
        sender: "alice@contoso.test".into(),
        wake,
        marks: Arc::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protocol::{Disposition, MailServer as _};

    /// A scripted server (with IDLE or without), a mailbox on it looking every `wake`,
    /// subscribed to INBOX, and its watch past the first report.
    async fn watching(
        idle: bool,
        wake: Duration,
    ) -> (
        Arc<Script>,
        ImapMailbox,
        Box<dyn crate::engine::protocol::Watch>,
    ) {
        let script = Script::new(idle);
        let mailbox = mailbox(script.serve().await, wake);
        mailbox.subscribe(&["INBOX".to_owned()]).await.unwrap();
        let mut watch = mailbox.open_watch("idle", 30).await.unwrap();
        let first = watch.next().await.unwrap().unwrap();
        assert!(first.new_items.is_empty(), "{first:?}");
        (script, mailbox, watch)
    }

    /// Waits for the watch's next report that lists mail, skipping the empty ones.
    async fn next_news(watch: &mut Box<dyn crate::engine::protocol::Watch>) -> Vec<String> {
        loop {
            let batch = tokio::time::timeout(Duration::from_secs(20), watch.next())
                .await
                .expect("a report within 20 s")
                .expect("no failure")
                .expect("the watch open");
            if !batch.new_items.is_empty() {
                return batch.new_items;
            }
        }
    }

    #[tokio::test]
    async fn a_command_ends_idle_and_runs_at_once_on_the_watchs_connection() {
        // A wake far away: only the command can end this IDLE.
        let (script, mailbox, mut watch) = watching(true, Duration::from_secs(600)).await;
        let uid = script.arrive();
        assert_eq!(next_news(&mut watch).await, vec![format!("7:{uid}:INBOX")]);
        // The watch is back in IDLE: a fetch takes it out, and the answer comes.
        let id = format!("7:{uid}:INBOX");
        let items = tokio::time::timeout(Duration::from_secs(20), mailbox.get_items(&[&id]))
            .await
            .expect("the fetch not left waiting for the watch")
            .unwrap();
        assert_eq!(items.len(), 1);
        assert!(
            matches!(&items[0], Ok(crate::engine::protocol::Item::Mail(_))),
            "{items:?}"
        );
        // And the watch goes on hearing news, on the same one connection.
        let uid = script.arrive();
        assert_eq!(next_news(&mut watch).await, vec![format!("7:{uid}:INBOX")]);
        assert_eq!(script.accepted.load(Ordering::SeqCst), 1);
        let commands = script.commands();
        let fetch = commands
            .iter()
            .position(|c| c.starts_with("UID FETCH"))
            .unwrap();
        assert_eq!(
            commands[fetch - 2..fetch],
            ["DONE", "EXAMINE \"INBOX\""],
            "{commands:?}"
        );
    }

    #[tokio::test]
    async fn a_server_without_idle_is_polled_on_each_wake() {
        let (script, _mailbox, mut watch) = watching(false, Duration::from_millis(200)).await;
        let uid = script.arrive();
        assert_eq!(next_news(&mut watch).await, vec![format!("7:{uid}:INBOX")]);
        assert!(
            !script.commands().iter().any(|c| c == "IDLE"),
            "{:?}",
            script.commands()
        );
    }

    #[tokio::test]
    async fn a_renumbered_folder_ends_the_watch_as_a_rejected_cursor() {
        let (script, _mailbox, mut watch) = watching(true, Duration::from_millis(300)).await;
        script.validity.store(8, Ordering::SeqCst);
        let failure = loop {
            match watch.next().await {
                Ok(_) => continue,
                Err(f) => break f,
            }
        };
        assert!(failure.cursor_rejected(), "{failure}");
    }

    #[tokio::test]
    async fn a_bye_in_idle_ends_the_watch_to_be_opened_again() {
        let (script, _mailbox, mut watch) = watching(true, Duration::from_secs(600)).await;
        // Wait until the watch is in IDLE, then the server goes.
        tokio::time::timeout(Duration::from_secs(20), async {
            while script.commands().last().map(String::as_str) != Some("IDLE") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the watch in IDLE");
        script.bye.store(true, Ordering::SeqCst);
        let failure = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                tokio::select! {
                    r = watch.next() => break r,
                    // Until the server's IDLE hears it.
                    () = tokio::time::sleep(Duration::from_millis(50)) => script.poke.notify_waiters(),
                }
            }
        })
        .await
        .expect("the failure reported")
        .unwrap_err();
        assert!(
            matches!(failure.disposition(), Disposition::Retry { .. }),
            "{failure}"
        );
        assert!(failure.to_string().contains("Shutting down"), "{failure}");
    }
}
