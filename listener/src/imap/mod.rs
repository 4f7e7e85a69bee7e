//! IMAP mailboxes (Creatio's `ServerTypeId` 844F0837-…): the engine's [`MailServer`] over
//! IMAP4rev1.
//!
//! A mailbox holds one connection, opened on first use and opened again after a failure,
//! shared by its commands and its watch ([`connection`]). Folders are IMAP mailbox names; an item
//! is `<UIDVALIDITY>:<UID>:<folder>`; a folder's sync state is `<UIDVALIDITY>:<last UID>`, so
//! catching up is `UID SEARCH UID <last+1>:*` and a changed UIDVALIDITY is a rejected cursor
//! (a new baseline, then the gap recovered by received time). Mail is read with
//! `BODY.PEEK[]`, which never marks it read, and converted by the one MIME converter.
//!
//! Watching: Subscribe notes each watched folder's UIDNEXT (what arrives from then on is
//! news); the watch IDLEs on the first folder between commands, and on news, or every `wake`,
//! ends IDLE and asks every watched folder's STATUS, listing the UIDs that came since
//! ([`watch`]). Each wake yields a report, so a silent connection is found within the engine's
//! idle timeout. A server without IDLE is looked at every `wake`.

mod connection;
pub mod failure;
#[cfg(test)]
mod scripted;
mod session;
mod smtp;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;

use crate::creatio::contract::send::OutgoingEmail;
use crate::creatio::contract::{Credentials, SecureOption};
use crate::creatio::mail::email_from_mime;
use crate::engine::protocol::{
    Answer, Connect, Failure, FindPage, Folder, Found, Item, Limits, MailServer, SyncPage, Watch,
};
use connection::Connection;
pub use connection::Slots;
use failure::ImapFailure;
pub use session::{Endpoint, Login, Security};
use session::{Session, Untagged, quoted};

/// Reaches IMAP servers.
#[derive(Debug, Clone)]
pub struct ImapConnect {
    /// The TLS configuration (trusted roots) for every IMAP server.
    pub tls: Arc<rustls::ClientConfig>,
    pub limits: Limits,
    /// How long a watch stays in IDLE before it looks at every folder and reports.
    pub wake: Duration,
    /// The connections each login may hold to each server.
    pub slots: Arc<Slots>,
}

impl ImapConnect {
    /// Where `ServiceUrl`, `Port`, `UseSsl` and `SecureOption` say the server is.
    pub fn endpoint(creds: &Credentials) -> Result<Endpoint, ImapFailure> {
        let address = creds
            .service_url
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| ImapFailure::Config("ServiceUrl (the IMAP host) is not set".into()))?;
        let host = address
            .split_once("://")
            .map_or(address, |(_, rest)| rest)
            .trim_end_matches('/');
        let (host, port_in_url) = match host.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, p.parse::<u16>().ok()),
            _ => (host, None),
        };
        let security = match creds.secure_option {
            Some(SecureOption::None) => Security::None,
            Some(SecureOption::Auto) => Security::Auto,
            Some(SecureOption::StartTls) => Security::StartTls,
            Some(SecureOption::Ssl) => Security::Tls,
            None if creds.use_ssl == Some(false) => Security::None,
            None => Security::Tls,
        };
        let port = creds
            .port
            .filter(|&p| p != 0)
            .or(port_in_url)
            .unwrap_or(match security {
                Security::Tls | Security::Auto => 993,
                Security::None | Security::StartTls => 143,
            });
        Ok(Endpoint {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            security,
        })
    }

    fn login(creds: &Credentials) -> Result<Login, ImapFailure> {
        let user = creds
            .user_name
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| creds.sender_email.clone());
        if let Some(token) = &creds.access_token {
            return Ok(Login::Token {
                user,
                token: token.clone(),
            });
        }
        match &creds.password {
            Some(password) => Ok(Login::Password {
                user,
                password: password.clone(),
            }),
            None => Err(ImapFailure::Config(
                "neither Password nor AccessToken is set for the IMAP mailbox".into(),
            )),
        }
    }
}

impl Connect for ImapConnect {
    fn connect(&self, creds: &Credentials) -> Result<Box<dyn MailServer>, Failure> {
        let endpoint = Self::endpoint(creds)?;
        // A send call names the SMTP server in the same fields.
        let smtp = Endpoint {
            port: match creds.port {
                Some(port) if port != 0 => port,
                _ => smtp::default_port(endpoint.security),
            },
            ..endpoint.clone()
        };
        Ok(Box::new(ImapMailbox {
            connection: Arc::new(Connection::new(
                endpoint,
                Self::login(creds)?,
                self.tls.clone(),
                self.limits,
                &self.slots,
            )),
            smtp,
            sender: creds.sender_email.clone(),
            wake: self.wake,
            marks: Arc::default(),
        }))
    }

    fn address(&self, creds: &Credentials) -> Option<String> {
        let e = Self::endpoint(creds).ok()?;
        Some(format!("imap://{}:{}", bracketed(&e.host), e.port))
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Where a watch stands in a folder: its UIDVALIDITY and the next UID that is news.
type Marks = Arc<Mutex<Vec<(String, u32, u32)>>>;

/// One IMAP mailbox.
#[derive(Debug)]
pub struct ImapMailbox {
    /// The one connection, for commands and the watch alike.
    connection: Arc<Connection>,
    /// The SMTP server, when these are a send call's credentials.
    smtp: Endpoint,
    /// The address mail goes out from.
    sender: String,
    wake: Duration,
    /// Per watched folder, set by Subscribe and moved on by the watch.
    marks: Marks,
}

/// A folder as EXAMINE left it selected.
struct Selected {
    validity: u32,
    next: Option<u32>,
}

async fn examine(s: &mut Session, folder: &str) -> Result<Selected, ImapFailure> {
    let mut selected = Selected {
        validity: 0,
        next: None,
    };
    for u in s.ok(&format!("EXAMINE {}", quoted(folder)?)).await? {
        match u {
            Untagged::UidValidity(v) => selected.validity = v,
            Untagged::UidNext(n) => selected.next = Some(n),
            _ => {}
        }
    }
    Ok(selected)
}

async fn search(s: &mut Session, criteria: &str) -> Result<Vec<u32>, ImapFailure> {
    let mut uids: Vec<u32> = s
        .ok(&format!("UID SEARCH {criteria}"))
        .await?
        .into_iter()
        .flat_map(|u| match u {
            Untagged::Search(uids) => uids,
            _ => Vec::new(),
        })
        .collect();
    uids.sort_unstable();
    uids.dedup();
    Ok(uids)
}

/// `uids` as a UID set.
fn uid_set(uids: &[u32]) -> String {
    uids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The received time of each UID.
async fn received_times(s: &mut Session, uids: &[u32]) -> Result<HashMap<u32, i64>, ImapFailure> {
    if uids.is_empty() {
        return Ok(HashMap::new());
    }
    let answers = s
        .ok(&format!("UID FETCH {} (UID INTERNALDATE)", uid_set(uids)))
        .await?;
    Ok(answers
        .into_iter()
        .filter_map(|u| match u {
            Untagged::Fetch {
                uid: Some(uid),
                received_unix_ms: Some(at),
                ..
            } => Some((uid, at)),
            _ => None,
        })
        .collect())
}

/// The page of `all` (UIDs in the order listed) from `offset`, as a search answers it; each
/// UID's received time where `times` has it.
fn find_page(
    folder: &str,
    validity: u32,
    all: &[u32],
    offset: u32,
    max_entries: u16,
    times: &HashMap<u32, i64>,
) -> FindPage {
    let page: Vec<u32> = page_of(all, offset, max_entries);
    let listed = page.len() as u32;
    FindPage {
        items: page
            .iter()
            .map(|&u| Found {
                id: item_id(validity, u, folder),
                received_unix_ms: times.get(&u).copied(),
            })
            .collect(),
        next_offset: Some(offset + listed),
        complete: (offset + listed) as usize >= all.len(),
        total: Some(all.len() as u32),
    }
}

fn page_of(all: &[u32], offset: u32, max_entries: u16) -> Vec<u32> {
    all.iter()
        .copied()
        .skip(offset as usize)
        .take(usize::from(max_entries))
        .collect()
}

fn item_id(validity: u32, uid: u32, folder: &str) -> String {
    format!("{validity}:{uid}:{folder}")
}

fn parse_item_id(id: &str) -> Option<(u32, u32, &str)> {
    let mut parts = id.splitn(3, ':');
    let validity = parts.next()?.parse().ok()?;
    let uid = parts.next()?.parse().ok()?;
    Some((validity, uid, parts.next()?))
}

/// IMAP's date for SEARCH SINCE: `d-Mon-yyyy`, the UTC day of the moment.
fn search_date(unix_ms: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let xs = crate::creatio::mail::xs_datetime(unix_ms);
    let year = &xs[..4];
    let month: usize = xs[5..7].parse().unwrap_or(1);
    let day: u32 = xs[8..10].parse().unwrap_or(1);
    format!("{day}-{}-{year}", MONTHS[month.clamp(1, 12) - 1])
}

/// Special-use folders that hold no mail to watch (RFC 6154).
const UNWATCHED: [&str; 4] = ["\\DRAFTS", "\\TRASH", "\\JUNK", "\\ALL"];

impl ImapMailbox {
    /// Runs `op` on the mailbox's connection (see [`Connection::run`]).
    async fn on_session<T>(
        &self,
        op: impl AsyncFnOnce(&mut Session) -> Result<T, ImapFailure>,
    ) -> Result<T, Failure> {
        Ok(self.connection.run(op).await?)
    }

    async fn list(&self) -> Result<Vec<(String, Option<char>, Vec<String>)>, Failure> {
        self.on_session(async |s| {
            Ok(s.ok("LIST \"\" \"*\"")
                .await?
                .into_iter()
                .filter_map(|u| match u {
                    Untagged::List {
                        name,
                        delimiter,
                        attributes,
                    } => Some((name, delimiter, attributes)),
                    _ => None,
                })
                .filter(|(_, _, attributes)| {
                    !attributes.iter().any(|a| {
                        a.eq_ignore_ascii_case("\\Noselect")
                            || a.eq_ignore_ascii_case("\\NonExistent")
                    })
                })
                .collect())
        })
        .await
    }
}

impl MailServer for ImapMailbox {
    fn url(&self) -> String {
        format!(
            "imap://{}:{}",
            bracketed(&self.connection.endpoint.host),
            self.connection.endpoint.port
        )
    }

    fn validate(&self) -> Answer<'_, ()> {
        async move {
            let mut s = self.connection.open().await?;
            examine(&mut s, "INBOX").await?;
            s.logout().await;
            Ok(())
        }
        .boxed()
    }

    fn folders(&self) -> Answer<'_, Vec<Folder>> {
        async move {
            Ok(self
                .list()
                .await?
                .into_iter()
                .map(|(name, delimiter, _)| {
                    let split = delimiter.and_then(|d| name.rsplit_once(d));
                    Folder {
                        parent_id: split.map(|(parent, _)| parent.to_owned()),
                        name: split.map_or(name.as_str(), |(_, leaf)| leaf).to_owned(),
                        id: name,
                        class: None,
                    }
                })
                .collect())
        }
        .boxed()
    }

    fn watched_folders<'a>(&'a self, asked: &'a [String]) -> Answer<'a, Vec<String>> {
        async move {
            if !asked.is_empty() {
                return Ok(asked.to_vec());
            }
            let mut folders = vec!["INBOX".to_owned()];
            for (name, _, attributes) in self.list().await? {
                let unwatched = attributes
                    .iter()
                    .any(|a| UNWATCHED.contains(&a.to_ascii_uppercase().as_str()));
                if !unwatched && !name.eq_ignore_ascii_case("INBOX") {
                    folders.push(name);
                }
            }
            Ok(folders)
        }
        .boxed()
    }

    fn subscribe<'a>(&'a self, folders: &'a [String]) -> Answer<'a, String> {
        async move {
            let marks = self
                .on_session(async |s| {
                    let mut marks = Vec::new();
                    for folder in folders {
                        let selected = examine(s, folder).await?;
                        let next = match selected.next {
                            Some(next) => next,
                            None => search(s, "ALL").await?.last().map_or(1, |u| u + 1),
                        };
                        marks.push((folder.clone(), selected.validity, next));
                    }
                    Ok(marks)
                })
                .await?;
            *self.marks.lock().unwrap_or_else(|p| p.into_inner()) = marks;
            Ok("idle".to_owned())
        }
        .boxed()
    }

    fn unsubscribe<'a>(&'a self, _subscription_id: &'a str) -> Answer<'a, ()> {
        async { Ok(()) }.boxed()
    }

    fn open_watch<'a>(
        &'a self,
        _subscription_id: &'a str,
        _timeout_minutes: u8,
    ) -> Answer<'a, Box<dyn Watch>> {
        async move {
            Ok(Box::new(watch::ImapWatch::start(
                self.connection.clone(),
                self.marks.clone(),
                self.wake,
            )) as Box<dyn Watch>)
        }
        .boxed()
    }

    fn sync_folder<'a>(
        &'a self,
        folder: &'a str,
        state: Option<&'a str>,
        max_changes: u16,
    ) -> Answer<'a, SyncPage> {
        async move {
            self.on_session(async |s| {
                let selected = examine(s, folder).await?;
                let known = state
                    .and_then(|st| st.split_once(':'))
                    .and_then(|(v, l)| Some((v.parse::<u32>().ok()?, l.parse::<u32>().ok()?)));
                let Some((validity, last)) = known else {
                    // A baseline: everything there now is old.
                    let next = match selected.next {
                        Some(next) => next,
                        None => search(s, "ALL").await?.last().map_or(1, |u| u + 1),
                    };
                    return Ok(SyncPage {
                        state: format!("{}:{}", selected.validity, next.saturating_sub(1)),
                        complete: true,
                        added: Vec::new(),
                    });
                };
                if validity != selected.validity {
                    return Err(ImapFailure::ValidityChanged {
                        folder: folder.to_owned(),
                    });
                }
                let newer: Vec<u32> = search(s, &format!("UID {}:*", last.saturating_add(1)))
                    .await?
                    .into_iter()
                    .filter(|&u| u > last)
                    .collect();
                let taken = &newer[..newer.len().min(usize::from(max_changes))];
                Ok(SyncPage {
                    state: format!("{validity}:{}", taken.last().copied().unwrap_or(last)),
                    complete: taken.len() == newer.len(),
                    added: taken
                        .iter()
                        .map(|&u| item_id(validity, u, folder))
                        .collect(),
                })
            })
            .await
        }
        .boxed()
    }

    fn find_recent_items<'a>(
        &'a self,
        folder: &'a str,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage> {
        async move {
            self.on_session(async |s| {
                let selected = examine(s, folder).await?;
                let mut all = search(s, "ALL").await?;
                all.reverse();
                let times = received_times(s, &page_of(&all, offset, max_entries)).await?;
                Ok(find_page(
                    folder,
                    selected.validity,
                    &all,
                    offset,
                    max_entries,
                    &times,
                ))
            })
            .await
        }
        .boxed()
    }

    fn find_received_since<'a>(
        &'a self,
        folder: &'a str,
        since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage> {
        async move {
            self.on_session(async |s| {
                let selected = examine(s, folder).await?;
                // SEARCH SINCE is by day: the whole day of the moment is loaded.
                let all = search(s, &format!("SINCE {}", search_date(since_unix_ms))).await?;
                Ok(find_page(
                    folder,
                    selected.validity,
                    &all,
                    offset,
                    max_entries,
                    &HashMap::new(),
                ))
            })
            .await
        }
        .boxed()
    }

    fn find_by_message_id<'a>(
        &'a self,
        folder: &'a str,
        message_id: &'a str,
    ) -> Answer<'a, Vec<String>> {
        async move {
            self.on_session(async |s| {
                let selected = examine(s, folder).await?;
                let uids = search(s, &format!("HEADER Message-ID {}", quoted(message_id)?)).await?;
                Ok(uids
                    .into_iter()
                    .rev()
                    .map(|u| item_id(selected.validity, u, folder))
                    .collect())
            })
            .await
        }
        .boxed()
    }

    fn get_items<'a>(&'a self, ids: &'a [&'a str]) -> Answer<'a, Vec<Result<Item, Failure>>> {
        async move {
            let mut bodies: HashMap<&str, Vec<u8>> = HashMap::new();
            // Folder by folder, in the order they come.
            let mut folders: Vec<&str> = Vec::new();
            for (_, _, folder) in ids.iter().filter_map(|id| parse_item_id(id)) {
                if !folders.contains(&folder) {
                    folders.push(folder);
                }
            }
            for folder in folders {
                let found = self
                    .on_session(async |s| {
                        let selected = examine(s, folder).await?;
                        let wanted: Vec<(u32, &str)> = ids
                            .iter()
                            .filter_map(|id| {
                                let (v, uid, f) = parse_item_id(id)?;
                                (f == folder && v == selected.validity).then_some((uid, *id))
                            })
                            .collect();
                        if wanted.is_empty() {
                            return Ok(Vec::new());
                        }
                        let uids: Vec<u32> = wanted.iter().map(|(u, _)| *u).collect();
                        let answers = s
                            .ok(&format!("UID FETCH {} (UID BODY.PEEK[])", uid_set(&uids)))
                            .await?;
                        Ok(answers
                            .into_iter()
                            .filter_map(|u| match u {
                                Untagged::Fetch {
                                    uid: Some(uid),
                                    body: Some(body),
                                    ..
                                } => wanted
                                    .iter()
                                    .find(|(w, _)| *w == uid)
                                    .map(|(_, id)| (*id, body)),
                                _ => None,
                            })
                            .collect())
                    })
                    .await?;
                bodies.extend(found);
            }
            Ok(ids
                .iter()
                .map(|id| {
                    Ok(match bodies.get(id) {
                        Some(body) => Item::Mail(Box::new(email_from_mime(id, body))),
                        // Expunged, moved, or renumbered: nothing left to deliver.
                        None => Item::Gone,
                    })
                })
                .collect())
        }
        .boxed()
    }

    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> Answer<'a, ()> {
        async move {
            let submission = crate::creatio::outgoing::submission(&self.sender, email)
                .map_err(smtp::SmtpFailure::Config)?;
            let c = &self.connection;
            smtp::submit(&self.smtp, &c.login, &c.tls, c.limits, &submission).await?;
            Ok(())
        }
        .boxed()
    }

    fn was_sent<'a>(&'a self, _message_id: &'a str) -> Answer<'a, bool> {
        async { Ok(false) }.boxed()
    }
}

/// A TLS configuration that trusts no certificate: for tests that reach no server over TLS.
#[cfg(test)]
pub(crate) fn trusting_no_one() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the provider's protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Arc::new(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(body: serde_json::Value) -> Credentials {
        crate::creatio::contract::parse_credentials_list(
            serde_json::json!([body]).to_string().as_bytes(),
        )
        .unwrap()
        .remove(0)
    }

    #[test]
    fn the_endpoint_is_read_as_creatio_writes_it() {
        let base = serde_json::json!({
            "Id": "m", "SenderEmailAddress": "a@contoso.test", "Password": "pw",
            "ServerTypeId": "844F0837-EAA0-4F40-B965-71F5DB9EAE6E",
            "BpmEndpoint": "http://creatio.test/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
        });
        let with = |extra: serde_json::Value| {
            let mut b = base.clone();
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            ImapConnect::endpoint(&creds(b)).unwrap()
        };
        let e = with(
            serde_json::json!({"ServiceUrl": "imap.contoso.test", "Port": 993, "SecureOption": 2}),
        );
        assert_eq!(
            (e.host.as_str(), e.port, e.security),
            ("imap.contoso.test", 993, Security::Tls)
        );
        let e = with(
            serde_json::json!({"ServiceUrl": "imap.contoso.test", "Port": 0, "SecureOption": 3}),
        );
        assert_eq!((e.port, e.security), (143, Security::StartTls));
        let e = with(
            serde_json::json!({"ServiceUrl": "127.0.0.1", "Port": 10143, "SecureOption": 0, "UseSsl": false}),
        );
        assert_eq!(
            (e.host.as_str(), e.port, e.security),
            ("127.0.0.1", 10143, Security::None)
        );
        let e = with(
            serde_json::json!({"ServiceUrl": "mail.contoso.test", "Port": 0, "SecureOption": 1}),
        );
        assert_eq!(
            (e.host.as_str(), e.port, e.security),
            ("mail.contoso.test", 993, Security::Auto)
        );
        assert!(
            ImapConnect::endpoint(&creds(base)).is_err(),
            "no ServiceUrl"
        );
    }

    #[test]
    fn item_ids_and_search_dates() {
        let id = item_id(17, 42, "Projects:2026");
        assert_eq!(parse_item_id(&id), Some((17, 42, "Projects:2026")));
        assert_eq!(parse_item_id("x:1:INBOX"), None);
        // 2026-12-07T08:00:00Z.
        assert_eq!(search_date(1_796_630_400_000), "7-Dec-2026");
        assert_eq!(uid_set(&[3, 5, 9]), "3,5,9");
    }
}
