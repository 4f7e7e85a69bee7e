//! What the mock holds: app registrations and the tokens issued to them, users with their mail
//! folders and messages, the faults asked for, and what was asked of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use mock_ews::NewMail;
use serde::{Deserialize, Serialize};

/// An app registration in a tenant, as Microsoft Entra knows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct App {
    pub tenant: String,
    pub client_id: String,
    /// The client secret, when it authenticates with one.
    #[serde(default)]
    pub secret: Option<String>,
    /// The certificate (PEM) whose key signs its client assertions, when it uses one.
    #[serde(default)]
    pub certificate_pem: Option<String>,
    /// An application access policy: the users it may read; every user when absent.
    #[serde(default)]
    pub users: Option<Vec<String>>,
}

/// The well-known folders every mailbox has: (well-known name, display name).
pub(crate) const WELL_KNOWN: [(&str, &str); 6] = [
    ("inbox", "Inbox"),
    ("sentitems", "Sent Items"),
    ("drafts", "Drafts"),
    ("deleteditems", "Deleted Items"),
    ("junkemail", "Junk Email"),
    ("archive", "Archive"),
];

#[derive(Debug, Clone)]
pub(crate) struct Folder {
    pub id: String,
    pub name: String,
    pub well_known: Option<&'static str>,
    /// `None` at the top (under the root).
    pub parent: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub id: String,
    pub folder: String,
    /// The mailbox-wide change number of its creation: delta lists by it.
    pub seq: u64,
    pub received_unix: i64,
    pub internet_message_id: String,
    pub subject: String,
    pub mime: Arc<Vec<u8>>,
}

#[derive(Debug, Default)]
pub(crate) struct User {
    pub upn: String,
    pub folders: Vec<Folder>,
    pub messages: Vec<Message>,
}

impl User {
    /// A folder by id or well-known name.
    pub fn folder(&self, key: &str) -> Option<&Folder> {
        self.folders
            .iter()
            .find(|f| f.id == key || f.well_known.is_some_and(|w| w.eq_ignore_ascii_case(key)))
    }

    /// A folder by display name (`Inbox`, `Projects`), ignoring case.
    pub fn folder_named(&self, name: &str) -> Option<&Folder> {
        self.folders
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
    }
}

/// A token issued by the token endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub client_id: String,
    pub expires: Instant,
}

/// A fault applied to the next Graph requests (the token endpoint included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 429 Too Many Requests with `Retry-After`.
    Throttle { count: u32, retry_after_secs: u64 },
    /// 503 Service Unavailable, no `Retry-After`.
    Unavailable { count: u32 },
}

/// A change-notification subscription on one folder's messages.
#[derive(Debug, Clone)]
pub(crate) struct Subscription {
    pub id: String,
    pub client_id: String,
    /// The user (lower case) and folder id whose new messages it reports.
    pub user: String,
    pub folder: String,
    pub resource: String,
    pub client_state: Option<String>,
    pub notification_url: String,
    pub lifecycle_url: Option<String>,
    pub expires_unix: i64,
}

/// A notification on its way to a subscriber: where, and the body.
pub(crate) type Outgoing = (String, serde_json::Value);

/// Counters of what was asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Every Graph request (not the control API), the token endpoint's included.
    pub requests: u64,
    pub tokens_issued: u64,
    /// Token requests refused (a wrong secret or assertion).
    pub tokens_refused: u64,
    pub delta_requests: u64,
    pub mime_reads: u64,
    pub sends: u64,
    /// Requests answered 429.
    pub throttled: u64,
    /// The most requests in flight at once for one user.
    pub max_in_flight_per_user: u32,
    /// Subscriptions created (each after its validation handshake succeeded), and those
    /// refused because the handshake failed.
    pub subscriptions_created: u64,
    pub subscriptions_refused: u64,
    pub subscriptions_renewed: u64,
    pub subscriptions_deleted: u64,
    /// Notifications posted to subscribers and answered 2xx, answered otherwise or not at
    /// all, and dropped on request.
    pub notifications_delivered: u64,
    pub notifications_failed: u64,
    pub notifications_dropped: u64,
    /// The slowest answer of a subscriber to a notification, in milliseconds.
    pub slowest_notification_ms: u64,
}

/// What a request was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// When it arrived: milliseconds since the Unix epoch.
    pub arrived_unix_ms: u64,
    /// When it was answered.
    pub at_unix_ms: u64,
}

/// The most request records kept (the oldest go first).
const RECORDS: usize = 2_000;

#[derive(Debug)]
pub(crate) struct Inner {
    pub apps: Vec<App>,
    pub tokens: HashMap<String, Token>,
    pub users: HashMap<String, User>,
    /// Delta tokens of an older generation are refused (`SyncStateNotFound`).
    pub delta_generation: u64,
    pub next_seq: u64,
    pub next_id: u64,
    pub faults: Vec<Fault>,
    pub stats: Stats,
    pub records: std::collections::VecDeque<RequestRecord>,
    pub in_flight: HashMap<String, u32>,
    pub token_lifetime: Duration,
    pub subscriptions: Vec<Subscription>,
    /// Notifications of the next new messages not sent (lost on the way, as Graph may).
    pub drop_notifications: u32,
    /// Where notifications go out (a task posts them).
    pub notifier: Option<tokio::sync::mpsc::UnboundedSender<Outgoing>>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            apps: Vec::new(),
            tokens: HashMap::new(),
            users: HashMap::new(),
            delta_generation: 1,
            next_seq: 1,
            next_id: 1,
            faults: Vec::new(),
            stats: Stats::default(),
            records: Default::default(),
            in_flight: HashMap::new(),
            token_lifetime: Duration::from_secs(3599),
            subscriptions: Vec::new(),
            drop_notifications: 0,
            notifier: None,
        }
    }
}

/// Why a control call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    NoSuchUser(String),
    NoSuchFolder(String),
    Invalid(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::NoSuchUser(u) => write!(f, "no user {u:?}"),
            ControlError::NoSuchFolder(n) => write!(f, "no folder {n:?}"),
            ControlError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ControlError {}

/// What the server assigned to a mail put into a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    pub id: String,
    pub internet_message_id: String,
}

/// A message as the control API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub id: String,
    pub folder: String,
    pub internet_message_id: String,
    pub subject: String,
    pub mime: String,
}

/// The mock's whole state, behind one lock (each request holds it briefly).
#[derive(Debug, Default)]
pub struct World {
    inner: Mutex<Inner>,
}

impl World {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    pub fn id(&mut self, prefix: &str) -> String {
        let n = self.next_id;
        self.next_id += 1;
        // Graph's ids are long opaque base64; these keep the look, and stay unique.
        format!("{prefix}AAMkAGI2{n:010}{:08x}AAA=", fastrand::u32(..))
    }

    pub fn user(&self, upn: &str) -> Result<&User, ControlError> {
        self.users
            .get(&upn.to_ascii_lowercase())
            .ok_or_else(|| ControlError::NoSuchUser(upn.to_owned()))
    }

    pub fn user_mut(&mut self, upn: &str) -> Result<&mut User, ControlError> {
        self.users
            .get_mut(&upn.to_ascii_lowercase())
            .ok_or_else(|| ControlError::NoSuchUser(upn.to_owned()))
    }

    pub fn create_user(&mut self, upn: &str) {
        let key = upn.to_ascii_lowercase();
        if self.users.contains_key(&key) {
            return;
        }
        let folders = WELL_KNOWN
            .iter()
            .map(|(well_known, name)| Folder {
                id: self.id("F"),
                name: (*name).to_owned(),
                well_known: Some(well_known),
                parent: None,
            })
            .collect();
        self.users.insert(
            key,
            User {
                upn: upn.to_owned(),
                folders,
                messages: Vec::new(),
            },
        );
    }

    /// Creates a folder under `parent` (by display name; at the top when `None`).
    pub fn create_folder(
        &mut self,
        upn: &str,
        name: &str,
        parent: Option<&str>,
    ) -> Result<String, ControlError> {
        let id = self.id("F");
        let user = self.user_mut(upn)?;
        let parent = match parent {
            None => None,
            Some(p) => Some(
                user.folder_named(p)
                    .ok_or_else(|| ControlError::NoSuchFolder(p.to_owned()))?
                    .id
                    .clone(),
            ),
        };
        user.folders.push(Folder {
            id: id.clone(),
            name: name.to_owned(),
            well_known: None,
            parent,
        });
        Ok(id)
    }

    /// Puts a mail into a user's folder (`mail.folder` by name; the inbox when absent).
    pub fn deliver(&mut self, upn: &str, mail: NewMail) -> Result<Delivered, ControlError> {
        let id = self.id("M");
        let seq = self.next_seq;
        let user = self.user(upn)?;
        let folder = match &mail.folder {
            Some(name) => user
                .folder_named(name)
                .ok_or_else(|| ControlError::NoSuchFolder(name.clone()))?,
            None => user.folder("inbox").expect("every user has an inbox"),
        }
        .id
        .clone();
        let upn = user.upn.clone();
        let subject = mail.subject.clone();
        let rendered = mock_ews::render(&id, &upn, mail);
        self.store(
            &upn,
            Message {
                id: id.clone(),
                folder,
                seq,
                received_unix: rendered.received_unix,
                internet_message_id: rendered.message_id.clone(),
                subject,
                mime: Arc::new(rendered.mime),
            },
        )?;
        Ok(Delivered {
            id,
            internet_message_id: rendered.message_id,
        })
    }

    /// Stores a message, taking the next change number.
    pub fn store(&mut self, upn: &str, mut message: Message) -> Result<(), ControlError> {
        message.seq = self.next_seq;
        self.next_seq += 1;
        let user = self.user_mut(upn)?;
        let key = user.upn.to_ascii_lowercase();
        let (id, folder) = (message.id.clone(), message.folder.clone());
        user.messages.push(message);
        self.notify_created(&key, &folder, &id);
        Ok(())
    }

    /// Tells every live subscription on the folder of a new message.
    fn notify_created(&mut self, user: &str, folder: &str, message: &str) {
        let now = mock_ews::clock::now_unix();
        let due: Vec<Outgoing> = self
            .subscriptions
            .iter()
            .filter(|s| s.user == user && s.folder == folder && s.expires_unix > now)
            .map(|s| {
                (
                    s.notification_url.clone(),
                    serde_json::json!({ "value": [{
                        "subscriptionId": s.id,
                        "subscriptionExpirationDateTime": mock_ews::clock::xs_datetime(s.expires_unix),
                        "clientState": s.client_state,
                        "changeType": "created",
                        "resource": format!("Users/{user}/Messages/{message}"),
                        "resourceData": {
                            "@odata.type": "#Microsoft.Graph.Message",
                            "@odata.id": format!("Users/{user}/Messages/{message}"),
                            "id": message,
                        },
                        "tenantId": "00000000-0000-0000-0000-000000000000",
                    }]}),
                )
            })
            .collect();
        for outgoing in due {
            if self.drop_notifications > 0 {
                self.drop_notifications -= 1;
                self.stats.notifications_dropped += 1;
                continue;
            }
            if let Some(notifier) = &self.notifier {
                let _ = notifier.send(outgoing);
            }
        }
    }

    /// Sends a lifecycle event to every subscription (to its lifecycle URL, else its
    /// notification URL); `subscriptionRemoved` removes them too.
    pub fn lifecycle(&mut self, event: &str) {
        for s in &self.subscriptions {
            let body = serde_json::json!({ "value": [{
                "subscriptionId": s.id,
                "subscriptionExpirationDateTime": mock_ews::clock::xs_datetime(s.expires_unix),
                "clientState": s.client_state,
                "lifecycleEvent": event,
                "resource": s.resource,
                "organizationId": "00000000-0000-0000-0000-000000000000",
            }]});
            let url = s
                .lifecycle_url
                .clone()
                .unwrap_or_else(|| s.notification_url.clone());
            if let Some(notifier) = &self.notifier {
                let _ = notifier.send((url, body));
            }
        }
        if event == "subscriptionRemoved" {
            self.subscriptions.clear();
        }
    }

    /// Takes one request's fault, if one is pending.
    pub fn take_fault(&mut self) -> Option<Fault> {
        let fault = self.faults.first_mut()?;
        let (left, taken) = match fault {
            Fault::Throttle { count, .. } | Fault::Unavailable { count } => {
                *count = count.saturating_sub(1);
                (*count, fault.clone())
            }
        };
        if left == 0 {
            self.faults.remove(0);
        }
        Some(taken)
    }

    pub fn record(&mut self, method: &str, path: &str, status: u16, arrived_unix_ms: u64) {
        if self.records.len() == RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(RequestRecord {
            method: method.to_owned(),
            path: path.to_owned(),
            status,
            arrived_unix_ms,
            at_unix_ms: mock_ews::clock::now_unix_ms() as u64,
        });
    }
}
