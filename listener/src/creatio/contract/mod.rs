//! Creatio's contract with the listener, in one place (see the project's
//! `creatio-contract.md`): the `SynchronizationCredentials` Creatio sends, the id lists, the
//! callbacks the listener posts back ([`callbacks`]), and the decisions taken where Creatio's
//! sources are silent. Bodies are read as Creatio writes them ([`json`]: unquoted names) and
//! property names are matched case-insensitively, as Json.NET does; the names of the contract
//! come first, and the names this listener once guessed (`UserPassword`, `ServerAddress`,
//! `SysAdminUnitName`, `TimeZoneId`) are read where the contract's are absent.

pub mod callbacks;
pub mod json;
pub mod send;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use callbacks::{
    Attachment, CallbackBody, Email, Importance, folder_list, full_email_payload,
    mailbox_state_payload, new_email_payload, refresh_token_payload, state_entry,
    ticks_from_unix_ms, ticks_now, unix_ms_from_ticks,
};
pub use send::{SendCommand, parse_send};

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The kind of mail server, from `ServerTypeId`: the only type flag Creatio sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerType {
    /// `3490BD45-4F4D-4613-AA06-454546F3342A`, and what a Creatio that sends no type means.
    #[default]
    Exchange,
    /// `844F0837-EAA0-4F40-B965-71F5DB9EAE6E`.
    Imap,
}

impl ServerType {
    pub const EXCHANGE_ID: &str = "3490bd45-4f4d-4613-aa06-454546f3342a";
    pub const IMAP_ID: &str = "844f0837-eaa0-4f40-b965-71f5db9eae6e";

    pub fn name(self) -> &'static str {
        match self {
            ServerType::Exchange => "Exchange",
            ServerType::Imap => "IMAP",
        }
    }
}

/// `SecureOption`: how a connection to an IMAP or SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecureOption {
    None,
    Auto,
    Ssl,
    StartTls,
}

/// Creatio's `SynchronizationCredentials`, as far as the listener uses it.
///
/// Its serde form is what the store seals (secrets included): it is written nowhere else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The mailbox id (a Creatio GUID).
    pub id: String,
    pub sender_email: String,
    pub user_name: Option<String>,
    #[serde(with = "sealed_secret")]
    pub password: Option<Secret>,
    /// An OAuth2 bearer token, used instead of the password when present.
    #[serde(with = "sealed_secret")]
    pub access_token: Option<Secret>,
    #[serde(default)]
    pub server_type: ServerType,
    /// `ServiceUrl`: Exchange's EWS URL, or a host to which `/EWS/Exchange.asmx` is
    /// appended; the IMAP host for an IMAP mailbox.
    pub service_url: Option<String>,
    /// `Port`: 0 (or absent) for Exchange; the IMAP port.
    #[serde(default)]
    pub port: Option<u16>,
    pub use_ssl: Option<bool>,
    #[serde(default)]
    pub secure_option: Option<SecureOption>,
    /// Creatio's callback for this mailbox; its last segment picks the mode.
    pub bpm_endpoint: String,
    /// `BpmUser`: the owner's login, echoed in callbacks.
    pub bpm_user: Option<String>,
    #[serde(default)]
    pub bpm_user_workspace: Option<String>,
    /// `BpmUserTimeZone`.
    pub bpm_user_time_zone: Option<String>,
    /// `Context`, echoed in `ProcessMailboxState`.
    #[serde(default)]
    pub context: Option<String>,
    /// `FolderIds`: empty means every mail folder.
    #[serde(default)]
    pub folder_ids: Vec<String>,
    /// `FeatureValues`: `UseImpersonation`, `MarkEmailsAsSynchronized`, `UseBinaryData`, ...
    #[serde(default)]
    pub features: Features,
}

/// `FeatureValues` as the names Creatio switched on: one switched off reads as one never
/// sent, and a mailbox keeps a few short names rather than a map (a 288-byte node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features(Box<[Box<str>]>);

impl Features {
    fn from_values(values: impl IntoIterator<Item = (String, bool)>) -> Self {
        let mut on: Vec<Box<str>> = values
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(name, _)| name.into_boxed_str())
            .collect();
        on.sort();
        on.dedup();
        Features(on.into_boxed_slice())
    }

    /// Whether Creatio switched this feature on (names matched case-insensitively).
    pub fn on(&self, name: &str) -> bool {
        self.0.iter().any(|on| on.eq_ignore_ascii_case(name))
    }

    /// The names switched on, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|name| &**name)
    }
}

/// Written as Creatio writes it, a map of names to booleans (those switched on).
impl Serialize for Features {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.names().map(|name| (name, true)))
    }
}

impl<'de> Deserialize<'de> for Features {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let values = BTreeMap::<String, bool>::deserialize(d)?;
        Ok(Features::from_values(values))
    }
}

impl Credentials {
    /// A feature Creatio switched on in `FeatureValues` (names matched case-insensitively).
    pub fn feature(&self, name: &str) -> bool {
        self.features.on(name)
    }

    /// The same mailbox settings, whatever `Context` each carries (Creatio sends a new one
    /// with each call, which is no reason to restart a mailbox).
    pub fn same_settings(&self, other: &Credentials) -> bool {
        self.without_context() == other.without_context()
    }

    /// These credentials with no `Context`.
    pub fn without_context(&self) -> Credentials {
        Credentials {
            context: None,
            ..self.clone()
        }
    }

    /// `UserName` and `Password` are a service account that acts as `SenderEmailAddress`.
    pub fn uses_impersonation(&self) -> bool {
        self.feature("UseImpersonation")
    }
}

/// Secrets in the sealed form: their plain value.
mod sealed_secret {
    use super::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(secret) => s.serialize_some(secret.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Secret::new))
    }
}

/// How new mail is handed to Creatio, chosen by the last segment of `BpmEndpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackMode {
    /// `NewEmail`: only item ids; Creatio fetches the mail itself.
    NewEmail,
    /// `ProcessFullEmail`: the whole mail.
    ProcessFullEmail,
}

/// Why a request body does not satisfy the contract. Every message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("request body must be {0}")]
    Shape(&'static str),
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field} must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("{field} {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Reads a body as Creatio writes it.
pub fn parse_json(body: &[u8]) -> Result<Value, ContractError> {
    json::parse(body).map_err(ContractError::NotJson)
}

/// The value of `name` in `obj`, matching the key case-insensitively.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// The value of the first of `names` present and not null: the contract's name, then the
/// older names read for the same property.
fn field_of<'a>(obj: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names
        .iter()
        .filter_map(|n| field(obj, n))
        .find(|v| !v.is_null())
}

/// The longest id, address or name accepted (a Creatio GUID is 36 characters).
pub const MAX_ID_CHARS: usize = 256;

/// The longest URL accepted.
const MAX_URL_CHARS: usize = 2_048;

/// The longest `Context` accepted.
const MAX_CONTEXT_CHARS: usize = 4_096;

/// The most folder ids or feature values one mailbox may carry.
const MAX_LIST_ITEMS: usize = 1_000;

/// A string Creatio may send: bounded, without control characters (which would forge lines
/// in a text log).
fn checked(field: &'static str, s: &str, max: usize) -> Result<(), ContractError> {
    if s.chars().count() > max {
        return Err(ContractError::Invalid {
            field,
            reason: format!("must be at most {max} characters"),
        });
    }
    if s.chars().any(char::is_control) {
        return Err(ContractError::Invalid {
            field,
            reason: "must not contain control characters".into(),
        });
    }
    Ok(())
}

/// A string property, under its contract name and any older ones (`names[0]` is the one
/// errors name), trimmed; empty reads as absent.
fn opt_string_of(
    obj: &Map<String, Value>,
    names: &[&'static str],
    max: usize,
) -> Result<Option<String>, ContractError> {
    let name = names[0];
    let value = match field_of(obj, names) {
        None => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s.trim().to_owned(),
        // Creatio sends GUIDs and numbers in places; accept an integer where a string is due,
        // but not one that JSON parsing rounded (two ids must never collapse into one).
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        Some(Value::Number(_)) => {
            return Err(ContractError::WrongType {
                field: name,
                expected: "a string or an integer",
            });
        }
        Some(_) => {
            return Err(ContractError::WrongType {
                field: name,
                expected: "a string",
            });
        }
    };
    checked(name, &value, max)?;
    Ok(Some(value))
}

fn opt_string(
    obj: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, ContractError> {
    opt_string_of(obj, &[name], MAX_ID_CHARS)
}

/// A password or token: any string (a token is long), never echoed in an error.
fn opt_secret(
    obj: &Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<Secret>, ContractError> {
    let name = names[0];
    match field_of(obj, names) {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() > 64 * 1024 => Err(ContractError::Invalid {
            field: name,
            reason: "must be at most 64 KiB".into(),
        }),
        Some(Value::String(s)) => Ok(Some(Secret(s.clone()))),
        Some(_) => Err(ContractError::WrongType {
            field: name,
            expected: "a string",
        }),
    }
}

/// `ServiceUrl`: an http(s) URL or a host name, without credentials in it.
fn service_url(obj: &Map<String, Value>) -> Result<Option<String>, ContractError> {
    let Some(address) = opt_string_of(obj, &["ServiceUrl", "ServerAddress"], MAX_URL_CHARS)? else {
        return Ok(None);
    };
    let invalid = |reason: &str| ContractError::Invalid {
        field: "ServiceUrl",
        reason: reason.to_owned(),
    };
    let lower = address.to_ascii_lowercase();
    let authority = match lower.find("://") {
        Some(_) if !(lower.starts_with("http://") || lower.starts_with("https://")) => {
            return Err(invalid("must be an http(s) URL or a host name"));
        }
        Some(i) => &address[i + 3..],
        None => address.as_str(),
    };
    let authority = authority.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(invalid(
            "must not carry a user name or password; use UserName and Password",
        ));
    }
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(invalid("must name a host"));
    }
    Ok(Some(address))
}

fn required(
    obj: &Map<String, Value>,
    name: &'static str,
    max: usize,
) -> Result<String, ContractError> {
    opt_string_of(obj, &[name], max)?.ok_or(ContractError::Missing(name))
}

fn opt_bool(obj: &Map<String, Value>, name: &'static str) -> Result<Option<bool>, ContractError> {
    match field(obj, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(_) => Err(ContractError::WrongType {
            field: name,
            expected: "a boolean",
        }),
    }
}

/// An integer within `range` (Creatio writes enums as integers).
fn opt_int(
    obj: &Map<String, Value>,
    name: &'static str,
    range: std::ops::RangeInclusive<i64>,
) -> Result<Option<i64>, ContractError> {
    let n = match field(obj, name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    match n {
        Some(n) if range.contains(&n) => Ok(Some(n)),
        Some(_) => Err(ContractError::Invalid {
            field: name,
            reason: format!("must be between {} and {}", range.start(), range.end()),
        }),
        None => Err(ContractError::WrongType {
            field: name,
            expected: "an integer",
        }),
    }
}

/// `ServerTypeId`: Exchange's or IMAP's GUID; absent, empty or the empty GUID mean Exchange.
fn server_type(obj: &Map<String, Value>) -> Result<ServerType, ContractError> {
    let Some(id) = opt_string(obj, "ServerTypeId")? else {
        return Ok(ServerType::Exchange);
    };
    let id = id
        .trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase();
    match id.as_str() {
        ServerType::EXCHANGE_ID | "00000000-0000-0000-0000-000000000000" => {
            Ok(ServerType::Exchange)
        }
        ServerType::IMAP_ID => Ok(ServerType::Imap),
        _ => Err(ContractError::Invalid {
            field: "ServerTypeId",
            reason: format!(
                "must be Exchange's ({}) or IMAP's ({}) mail server type",
                ServerType::EXCHANGE_ID.to_ascii_uppercase(),
                ServerType::IMAP_ID.to_ascii_uppercase()
            ),
        }),
    }
}

/// `SecureOption`: None 0, Auto 1, Ssl 2, StartTls 3.
fn secure_option(obj: &Map<String, Value>) -> Result<Option<SecureOption>, ContractError> {
    Ok(opt_int(obj, "SecureOption", 0..=3)?.map(|n| match n {
        0 => SecureOption::None,
        1 => SecureOption::Auto,
        2 => SecureOption::Ssl,
        _ => SecureOption::StartTls,
    }))
}

/// `Context`: a string Creatio reads back; an object sent in its place is kept as its JSON.
fn context(obj: &Map<String, Value>) -> Result<Option<String>, ContractError> {
    let text = match field(obj, "Context") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "Context",
                expected: "a string",
            });
        }
    };
    checked("Context", &text, MAX_CONTEXT_CHARS)?;
    Ok(Some(text))
}

/// `FolderIds`: a list of strings; null is the empty list.
fn string_list(obj: &Map<String, Value>, name: &'static str) -> Result<Vec<String>, ContractError> {
    let wrong = ContractError::WrongType {
        field: name,
        expected: "an array of strings",
    };
    match field(obj, name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() > MAX_LIST_ITEMS => Err(ContractError::Invalid {
            field: name,
            reason: format!("must have at most {MAX_LIST_ITEMS} items"),
        }),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => {
                    checked(name, s, MAX_URL_CHARS)?;
                    Ok(s.clone())
                }
                _ => Err(wrong.clone()),
            })
            .collect(),
        Some(_) => Err(wrong),
    }
}

/// `FeatureValues`: names to booleans; null is none.
fn feature_values(obj: &Map<String, Value>) -> Result<Features, ContractError> {
    let wrong = ContractError::WrongType {
        field: "FeatureValues",
        expected: "an object of booleans",
    };
    match field(obj, "FeatureValues") {
        None | Some(Value::Null) => Ok(Features::default()),
        Some(Value::Object(m)) if m.len() > MAX_LIST_ITEMS => Err(ContractError::Invalid {
            field: "FeatureValues",
            reason: format!("must have at most {MAX_LIST_ITEMS} entries"),
        }),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                checked("FeatureValues", k, MAX_ID_CHARS)?;
                match v {
                    Value::Bool(b) => Ok((k.clone(), *b)),
                    _ => Err(wrong.clone()),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Features::from_values),
        Some(_) => Err(wrong),
    }
}

/// The mode a callback URL selects, or why it selects none.
pub fn callback_mode(bpm_endpoint: &str) -> Result<CallbackMode, ContractError> {
    let invalid = |reason: &str| ContractError::Invalid {
        field: "BpmEndpoint",
        reason: reason.to_owned(),
    };
    let lower = bpm_endpoint.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(invalid("must be an absolute http(s) URL"));
    }
    let path = lower.split(['?', '#']).next().unwrap_or("");
    match path.trim_end_matches('/').rsplit('/').next() {
        Some("processfullemail") => Ok(CallbackMode::ProcessFullEmail),
        Some("newemail") => Ok(CallbackMode::NewEmail),
        _ => Err(invalid("must end in /NewEmail or /ProcessFullEmail")),
    }
}

/// The URL of a sibling operation of `BpmEndpoint` on the same service (its last path
/// segment replaced).
pub fn sibling_url(bpm_endpoint: &str, operation: &str) -> String {
    let base = bpm_endpoint
        .split(['?', '#'])
        .next()
        .unwrap_or(bpm_endpoint);
    let base = base.trim_end_matches('/');
    match base.rfind('/') {
        Some(i) => format!("{}/{operation}", &base[..i]),
        None => operation.to_owned(),
    }
}

/// Which fields a credentials object must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Create, Recreate, Update: a mailbox to run.
    Subscription,
    /// Validate: only what it takes to log in.
    Validation,
}

fn credentials_from(value: &Value, purpose: Purpose) -> Result<Credentials, ContractError> {
    let Value::Object(obj) = value else {
        return Err(ContractError::Shape("a credentials object"));
    };
    let subscription = purpose == Purpose::Subscription;
    let id = if subscription {
        required(obj, "Id", MAX_ID_CHARS)?
    } else {
        opt_string(obj, "Id")?.unwrap_or_default()
    };
    let sender_email = required(obj, "SenderEmailAddress", MAX_ID_CHARS)?;
    if !sender_email.contains('@') {
        return Err(ContractError::Invalid {
            field: "SenderEmailAddress",
            reason: "must be an email address".into(),
        });
    }
    let bpm_endpoint = if subscription {
        let url = required(obj, "BpmEndpoint", MAX_URL_CHARS)?;
        callback_mode(&url)?;
        url
    } else {
        opt_string_of(obj, &["BpmEndpoint"], MAX_URL_CHARS)?.unwrap_or_default()
    };
    let port = opt_int(obj, "Port", 0..=65_535)?
        .filter(|&p| p != 0)
        .map(|p| p as u16);
    let use_oauth = opt_bool(obj, "UseOAuth")?;
    let mut access_token = opt_secret(obj, &["AccessToken"])?;
    if use_oauth == Some(false) {
        // Creatio names the login to use; a stale token left beside a password is not it.
        access_token = None;
    }
    // Read for their types only: a wrong one is an error here, not a surprise later.
    opt_bool(obj, "IsAutodiscover")?;
    opt_string_of(obj, &["AutodiscoverRedirectUrl"], MAX_URL_CHARS)?;
    opt_int(obj, "SubscriptionTtl", i64::MIN..=i64::MAX)?;
    opt_bool(obj, "PersonalMetrics")?;
    opt_bool(obj, "UseFullEmail")?;
    opt_string(obj, "FolderClassName")?;
    Ok(Credentials {
        id,
        sender_email,
        user_name: opt_string(obj, "UserName")?,
        password: opt_secret(obj, &["Password", "UserPassword"])?,
        access_token,
        server_type: server_type(obj)?,
        service_url: service_url(obj)?,
        port,
        use_ssl: opt_bool(obj, "UseSsl")?,
        secure_option: secure_option(obj)?,
        bpm_endpoint,
        bpm_user: opt_string_of(obj, &["BpmUser", "SysAdminUnitName"], MAX_ID_CHARS)?,
        bpm_user_workspace: opt_string(obj, "BpmUserWorkspace")?,
        bpm_user_time_zone: opt_string_of(obj, &["BpmUserTimeZone", "TimeZoneId"], MAX_ID_CHARS)?,
        context: context(obj)?,
        folder_ids: string_list(obj, "FolderIds")?,
        features: feature_values(obj)?,
    })
}

/// Create/Recreate/Update: an array of credentials objects, or one bare object.
pub fn parse_credentials_list(body: &[u8]) -> Result<Vec<Credentials>, ContractError> {
    match parse_json(body)? {
        Value::Array(items) if items.is_empty() => Err(ContractError::Shape(
            "a non-empty array of credentials objects",
        )),
        Value::Array(items) => items
            .iter()
            .map(|v| credentials_from(v, Purpose::Subscription))
            .collect(),
        obj @ Value::Object(_) => Ok(vec![credentials_from(&obj, Purpose::Subscription)?]),
        _ => Err(ContractError::Shape("an array of credentials objects")),
    }
}

/// Validate: one credentials object, or an array of exactly one.
pub fn parse_validation(body: &[u8]) -> Result<Credentials, ContractError> {
    match parse_json(body)? {
        Value::Array(items) if items.len() == 1 => credentials_from(&items[0], Purpose::Validation),
        obj @ Value::Object(_) => credentials_from(&obj, Purpose::Validation),
        _ => Err(ContractError::Shape("one credentials object")),
    }
}

/// `mailbox/folders`: the credentials to log in with, and the class of folders asked for
/// (`IPF.Note`, `IPF.Appointment`, ...; none for every folder).
pub fn parse_folders_request(body: &[u8]) -> Result<(Credentials, Option<String>), ContractError> {
    let value = match parse_json(body)? {
        Value::Array(mut items) if items.len() == 1 => items.remove(0),
        obj @ Value::Object(_) => obj,
        _ => return Err(ContractError::Shape("one credentials object")),
    };
    let creds = credentials_from(&value, Purpose::Validation)?;
    let class = match &value {
        Value::Object(obj) => opt_string_of(obj, &["FolderClassName"], MAX_ID_CHARS)?,
        _ => None,
    };
    Ok((creds, class.filter(|c| !c.trim().is_empty())))
}

/// The most Message-IDs one fetch may ask for.
const MAX_FETCH_IDS: usize = 1_000;

/// The longest Message-ID accepted (a header line's limit).
const MAX_MESSAGE_ID_CHARS: usize = 998;

/// `SyncEmailsCommand{Credentials, Filters}`: a mailbox's credentials, its callback included,
/// and the filters (up to `max_filters` characters), as `email/fetch` and `email/synchronize`
/// send them.
fn sync_command(body: &[u8], max_filters: usize) -> Result<(Credentials, String), ContractError> {
    let Value::Object(command) = parse_json(body)? else {
        return Err(ContractError::Shape("a SyncEmailsCommand object"));
    };
    let creds = match field(&command, "Credentials") {
        Some(c @ Value::Object(_)) => credentials_from(c, Purpose::Subscription)?,
        _ => {
            return Err(ContractError::Invalid {
                field: "Credentials",
                reason: "must be the mailbox's credentials object".into(),
            });
        }
    };
    let filters = opt_string_of(&command, &["Filters"], max_filters)?.unwrap_or_default();
    Ok((creds, filters))
}

/// `email/fetch`: `SyncEmailsCommand{Credentials, Filters}`, the filters the Message-IDs to
/// fetch joined by `;`.
pub fn parse_fetch(body: &[u8]) -> Result<(Credentials, Vec<String>), ContractError> {
    let (creds, filters) = sync_command(body, MAX_FETCH_IDS * (MAX_MESSAGE_ID_CHARS + 1))?;
    let ids: Vec<String> = filters
        .split(';')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.is_empty() {
        return Err(ContractError::Invalid {
            field: "Filters",
            reason: "must name at least one Message-ID".into(),
        });
    }
    if ids.len() > MAX_FETCH_IDS {
        return Err(ContractError::Invalid {
            field: "Filters",
            reason: format!("must name at most {MAX_FETCH_IDS} Message-IDs"),
        });
    }
    for id in &ids {
        checked("Filters", id, MAX_MESSAGE_ID_CHARS)?;
    }
    Ok((creds, ids))
}

/// Where a history load starts, as `email/synchronize`'s `Filters` say for the mailbox's kind
/// of server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadFrom {
    /// Exchange: the load-from date, in milliseconds since the Unix epoch.
    Date(i64),
    /// IMAP: a SEARCH expression that names no date (`UID 42:*`, `UNKEYWORD ...`).
    ImapSearch(String),
}

/// The SEARCH keys Creatio's IMAP filters use; anything else is refused, never passed on.
const IMAP_FILTER_KEYS: [&str; 6] = [
    "UNDRAFT",
    "UNDELETED",
    "SENTSINCE",
    "SINCE",
    "UID",
    "UNKEYWORD",
];

/// Reads Creatio's IMAP history filter (`UNDRAFT UNDELETED SENTSINCE 01-Dec-2026`): the day
/// it loads from (00:00 UTC), or none when it names no date.
fn imap_filter_since(filters: &str) -> Result<Option<i64>, ContractError> {
    let invalid = |reason: String| ContractError::Invalid {
        field: "Filters",
        reason,
    };
    let mut since = None;
    let mut tokens = filters.split_ascii_whitespace();
    while let Some(token) = tokens.next() {
        let key = token.to_ascii_uppercase();
        if !IMAP_FILTER_KEYS.contains(&key.as_str()) {
            return Err(invalid(format!(
                "holds {token:?}; an IMAP filter may use only {}",
                IMAP_FILTER_KEYS.join(", ")
            )));
        }
        match key.as_str() {
            "SENTSINCE" | "SINCE" => {
                let date = tokens.next().unwrap_or_default();
                since = Some(imap_date(date).ok_or_else(|| {
                    invalid(format!(
                        "{date:?} after {key} is not a date like 01-Dec-2026"
                    ))
                })?);
            }
            "UID" | "UNKEYWORD" => {
                let argument = tokens.next().unwrap_or_default();
                if argument.is_empty()
                    || !argument
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"$_-:*,.".contains(&b))
                {
                    return Err(invalid(format!("{key} needs a plain argument")));
                }
            }
            _ => {}
        }
    }
    Ok(since)
}

/// An IMAP date (`1-Dec-2026`, `01-Dec-2026`) as 00:00 UTC of that day, in Unix ms.
fn imap_date(date: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ];
    let mut parts = date.trim_matches('"').split('-');
    let day: u32 = parts.next()?.parse().ok()?;
    let month = parts.next()?.to_ascii_uppercase();
    let month = MONTHS.iter().position(|m| *m == month)? + 1;
    let year: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=31).contains(&day) || !(1970..=9999).contains(&year) {
        return None;
    }
    crate::creatio::mail::parse_xs_datetime(&format!("{year:04}-{month:02}-{day:02}T00:00:00Z"))
}

/// `email/synchronize`: the mailbox's credentials and where its history load starts. For an
/// Exchange mailbox `Filters` is the load-from date in UTC .NET ticks; a date in the future is
/// refused, as is one before 1970. For an IMAP mailbox it is an IMAP SEARCH expression of the
/// keys Creatio writes, whose `SENTSINCE` or `SINCE` date is the load's day.
pub fn parse_synchronize(body: &[u8]) -> Result<(Credentials, LoadFrom), ContractError> {
    let (creds, filters) = sync_command(body, MAX_CONTEXT_CHARS)?;
    if creds.server_type == ServerType::Imap {
        return Ok(match imap_filter_since(&filters)? {
            Some(since) => (creds, LoadFrom::Date(since)),
            None => (creds, LoadFrom::ImapSearch(filters)),
        });
    }
    let invalid = |reason: &str| ContractError::Invalid {
        field: "Filters",
        reason: reason.to_owned(),
    };
    let ticks: i64 = filters
        .parse()
        .map_err(|_| invalid("must be the load-from date in .NET ticks (UTC)"))?;
    let since = unix_ms_from_ticks(ticks);
    if since < 0 {
        return Err(invalid("must be a date after 1970"));
    }
    if since > crate::creatio::mail::unix_now_ms() + 24 * 3_600_000 {
        return Err(invalid("must not be a date in the future"));
    }
    Ok((creds, LoadFrom::Date(since)))
}

/// Close/SubscriptionsState: an array of mailbox ids, or one bare id.
pub fn parse_ids(body: &[u8]) -> Result<Vec<String>, ContractError> {
    let as_id = |v: &Value| match v {
        Value::String(s) if !s.trim().is_empty() => {
            checked("mailbox id", s.trim(), MAX_ID_CHARS)?;
            Ok(s.trim().to_owned())
        }
        _ => Err(ContractError::WrongType {
            field: "mailbox id",
            expected: "a non-empty string",
        }),
    };
    match parse_json(body)? {
        Value::Array(items) => items.iter().map(as_id).collect(),
        v @ Value::String(_) => Ok(vec![as_id(&v)?]),
        _ => Err(ContractError::Shape("an array of mailbox ids")),
    }
}

/// `availability/app`: the Creatio callback URL, as a JSON string (or bare text).
pub fn parse_callback_url(body: &[u8]) -> Result<String, ContractError> {
    let url = match parse_json(body) {
        Ok(Value::String(s)) => s,
        Ok(_) => {
            return Err(ContractError::Shape(
                "a JSON string: Creatio's callback URL",
            ));
        }
        // Some clients post the URL unquoted.
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let url = url.trim().to_owned();
    checked("callback URL", &url, MAX_URL_CHARS)?;
    let lower = url.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(ContractError::Invalid {
            field: "callback URL",
            reason: "must be an absolute http(s) URL".into(),
        });
    }
    Ok(url)
}

/// A short description of a JSON body's shape, with no values: for logging unknown calls.
pub fn body_shape(body: &[u8]) -> String {
    fn shape(v: &Value) -> String {
        match v {
            Value::Object(m) => format!("{{{}}}", m.keys().cloned().collect::<Vec<_>>().join(",")),
            Value::Array(a) => format!(
                "[{}; {}]",
                a.first().map(shape).unwrap_or_default(),
                a.len()
            ),
            Value::String(_) => "string".into(),
            Value::Number(_) => "number".into(),
            Value::Bool(_) => "bool".into(),
            Value::Null => "null".into(),
        }
    }
    match json::parse(body) {
        Ok(v) => shape(&v),
        Err(_) if body.is_empty() => "empty".into(),
        Err(_) => format!("non-JSON, {} bytes", body.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_load_reads_its_date_in_ticks() {
        let body = |filters: &str| format!(r#"{{"Credentials":{GOOD},"Filters":"{filters}"}}"#);
        // 2026-12-01T00:00:00Z.
        let (creds, since) = parse_synchronize(body("639316800000000000").as_bytes()).unwrap();
        assert_eq!(creds.id, "m1");
        assert_eq!(since, LoadFrom::Date(1_796_083_200_000));
        assert_eq!(
            ticks_from_unix_ms(1_796_083_200_000),
            639_316_800_000_000_000
        );
        for bad in ["", "UNDELETED SINCE 01-Dec-2026", "1", "999999999999999999"] {
            let e = parse_synchronize(body(bad).as_bytes()).unwrap_err();
            assert!(e.to_string().starts_with("Filters"), "{bad}: {e}");
        }
    }

    const GOOD: &str = r#"{"id":"m1","SENDEREMAILADDRESS":"a@b.c","Password":"pw","BpmEndpoint":"https://crm/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail","Unknown":1}"#;

    /// A Create body as Creatio 8.1 writes it: names unquoted, nulls written, enums as
    /// integers.
    const CREATIO: &str = concat!(
        "[{Id:\"8f0e2a6c-1d4b-4c36-9f1e-6a0b1c2d3e4f\",UserName:\"CONTOSO\\\\alice\",",
        "Password:\"Pa55\",AccessToken:null,SenderEmailAddress:\"alice@contoso.com\",",
        "ServiceUrl:\"https://mail.contoso.com/EWS/Exchange.asmx\",Port:0,UseSsl:true,",
        "SecureOption:2,IsAutodiscover:false,AutodiscoverRedirectUrl:null,UseOAuth:false,",
        "ServerTypeId:\"3490bd45-4f4d-4613-aa06-454546f3342a\",SubscriptionTtl:1440,",
        "BpmEndpoint:\"https://crm.contoso.com/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail\",",
        "BpmUser:\"Supervisor\",BpmUserWorkspace:\"Default\",BpmUserTimeZone:\"FLE Standard Time\",",
        "Context:\"{UserRequested:true,HasError:false}\",FolderClassName:null,FolderIds:[],",
        "PersonalMetrics:false,UseFullEmail:true,",
        "FeatureValues:{MarkEmailsAsSynchronized:false,UseBinaryData:false,UseImpersonation:false}}]"
    );

    #[test]
    fn reads_a_create_as_creatio_writes_it() {
        let c = parse_credentials_list(CREATIO.as_bytes())
            .unwrap()
            .remove(0);
        assert_eq!(c.id, "8f0e2a6c-1d4b-4c36-9f1e-6a0b1c2d3e4f");
        assert_eq!(c.user_name.as_deref(), Some("CONTOSO\\alice"));
        assert_eq!(c.password.as_ref().unwrap().expose(), "Pa55");
        assert_eq!(c.access_token, None);
        assert_eq!(
            c.service_url.as_deref(),
            Some("https://mail.contoso.com/EWS/Exchange.asmx")
        );
        assert_eq!(c.port, None, "Port 0 is no port");
        assert_eq!(c.use_ssl, Some(true));
        assert_eq!(c.secure_option, Some(SecureOption::Ssl));
        assert_eq!(c.server_type, ServerType::Exchange);
        assert_eq!(c.bpm_user.as_deref(), Some("Supervisor"));
        assert_eq!(c.bpm_user_workspace.as_deref(), Some("Default"));
        assert_eq!(c.bpm_user_time_zone.as_deref(), Some("FLE Standard Time"));
        assert_eq!(
            c.context.as_deref(),
            Some("{UserRequested:true,HasError:false}")
        );
        assert!(c.folder_ids.is_empty());
        assert!(!c.uses_impersonation());
        // All three sent switched off: as none sent.
        assert_eq!(c.features, Features::default());
    }

    #[test]
    fn features_keep_the_names_switched_on_and_read_back_as_a_map() {
        let body = r#"[{"Id":"m","SenderEmailAddress":"a@b.c","BpmEndpoint":"http://x/NewEmail","FeatureValues":{"UseImpersonation":true,"UseBinaryData":false,"MarkEmailsAsSynchronized":true}}]"#;
        let c = parse_credentials_list(body.as_bytes()).unwrap().remove(0);
        assert!(c.feature("useimpersonation"));
        assert!(c.feature("MarkEmailsAsSynchronized"));
        assert!(!c.feature("UseBinaryData"));
        assert_eq!(
            c.features.names().collect::<Vec<_>>(),
            ["MarkEmailsAsSynchronized", "UseImpersonation"]
        );
        let written = serde_json::to_value(&c.features).unwrap();
        assert_eq!(
            written,
            serde_json::json!({"MarkEmailsAsSynchronized": true, "UseImpersonation": true})
        );
        // As a sealed copy written before reads back: what was off is dropped.
        let read: Features = serde_json::from_value(
            serde_json::json!({"UseImpersonation": true, "UseBinaryData": false}),
        )
        .unwrap();
        assert_eq!(read.names().collect::<Vec<_>>(), ["UseImpersonation"]);
    }

    #[test]
    fn the_names_once_guessed_still_read() {
        let body = r#"[{"Id":"m","SenderEmailAddress":"a@b.c","UserPassword":"pw","ServerAddress":"mail.contoso.com","SysAdminUnitName":"Supervisor","TimeZoneId":"UTC","BpmEndpoint":"http://x/NewEmail"}]"#;
        let c = parse_credentials_list(body.as_bytes()).unwrap().remove(0);
        assert_eq!(c.password.unwrap().expose(), "pw");
        assert_eq!(c.service_url.as_deref(), Some("mail.contoso.com"));
        assert_eq!(c.bpm_user.as_deref(), Some("Supervisor"));
        assert_eq!(c.bpm_user_time_zone.as_deref(), Some("UTC"));
        // The contract's name wins where both are sent.
        let both = r#"{Id:"m",SenderEmailAddress:"a@b.c",Password:"new",UserPassword:"old",BpmEndpoint:"http://x/NewEmail"}"#;
        let c = parse_credentials_list(both.as_bytes()).unwrap().remove(0);
        assert_eq!(c.password.unwrap().expose(), "new");
    }

    #[test]
    fn server_types_and_enums() {
        let parse = |extra: &str| {
            let body = format!(
                r#"{{Id:"m",SenderEmailAddress:"a@b.c",BpmEndpoint:"http://x/NewEmail",{extra}}}"#
            );
            parse_credentials_list(body.as_bytes()).map(|mut l| l.remove(0))
        };
        let imap = parse(r#"ServerTypeId:"844F0837-EAA0-4F40-B965-71F5DB9EAE6E",ServiceUrl:"imap.contoso.com",Port:993,SecureOption:3"#).unwrap();
        assert_eq!(imap.server_type, ServerType::Imap);
        assert_eq!(imap.port, Some(993));
        assert_eq!(imap.secure_option, Some(SecureOption::StartTls));
        assert_eq!(
            parse(r#"ServerTypeId:"00000000-0000-0000-0000-000000000000""#)
                .unwrap()
                .server_type,
            ServerType::Exchange
        );
        assert!(
            parse(r#"ServerTypeId:"11111111-2222-3333-4444-555555555555""#)
                .unwrap_err()
                .to_string()
                .starts_with("ServerTypeId must be Exchange's")
        );
        assert_eq!(
            parse("SecureOption:7").unwrap_err().to_string(),
            "SecureOption must be between 0 and 3"
        );
        assert_eq!(
            parse("Port:70000").unwrap_err().to_string(),
            "Port must be between 0 and 65535"
        );
        assert_eq!(
            parse("UseSsl:1").unwrap_err().to_string(),
            "UseSsl must be a boolean"
        );
        assert_eq!(
            parse("FolderIds:[1]").unwrap_err().to_string(),
            "FolderIds must be an array of strings"
        );
        assert_eq!(
            parse("FeatureValues:{UseImpersonation:1}")
                .unwrap_err()
                .to_string(),
            "FeatureValues must be an object of booleans"
        );
        let imp = parse(r#"FeatureValues:{useimpersonation:true},FolderIds:["AAMkA=","AAMkB="]"#)
            .unwrap();
        assert!(imp.uses_impersonation());
        assert_eq!(imp.folder_ids, ["AAMkA=", "AAMkB="]);
        // A token beside UseOAuth: false is not the login Creatio means.
        let basic = parse(r#"UseOAuth:false,AccessToken:"stale",Password:"pw""#).unwrap();
        assert_eq!(basic.access_token, None);
        let oauth = parse(r#"UseOAuth:true,AccessToken:"tok""#).unwrap();
        assert_eq!(oauth.access_token.unwrap().expose(), "tok");
    }

    #[test]
    fn context_does_not_make_other_settings() {
        let parse = |context: &str| {
            let body = format!(
                r#"{{Id:"m",SenderEmailAddress:"a@b.c",BpmEndpoint:"http://x/NewEmail",Context:{context}}}"#
            );
            parse_credentials_list(body.as_bytes()).unwrap().remove(0)
        };
        let a = parse(r#""{UserRequested:true,HasError:false}""#);
        let b = parse(r#""{UserRequested:false,HasError:false}""#);
        assert_ne!(a, b);
        assert!(a.same_settings(&b));
        assert_eq!(
            parse(r#"{UserRequested:true}"#).context.as_deref(),
            Some(r#"{"UserRequested":true}"#)
        );
    }

    #[test]
    fn the_callback_url_of_an_availability_check() {
        assert_eq!(
            parse_callback_url(
                br#""http://crm/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail""#
            )
            .unwrap(),
            "http://crm/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail"
        );
        assert_eq!(
            parse_callback_url(b"https://crm/x").unwrap(),
            "https://crm/x"
        );
        assert!(parse_callback_url(br#""ftp://crm""#).is_err());
        assert!(parse_callback_url(br#"{"Url":"http://crm"}"#).is_err());
    }

    #[test]
    fn accepts_an_object_or_an_array_with_any_key_case() {
        let one = parse_credentials_list(GOOD.as_bytes()).unwrap();
        let many = parse_credentials_list(format!("[{GOOD}]").as_bytes()).unwrap();
        assert_eq!(one, many);
        assert_eq!(one[0].id, "m1");
        assert_eq!(one[0].sender_email, "a@b.c");
        assert_eq!(one[0].password.as_ref().unwrap().expose(), "pw");
        assert!(
            !format!("{:?}", one[0]).contains("pw"),
            "secrets never print"
        );
    }

    #[test]
    fn names_the_missing_or_bad_field() {
        let msg = |body: &str| {
            parse_credentials_list(body.as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            msg(r#"[{"SenderEmailAddress":"a@b.c","BpmEndpoint":"http://x/NewEmail"}]"#),
            "Id is required"
        );
        assert_eq!(
            msg(r#"[{"Id":"1","BpmEndpoint":"http://x/NewEmail"}]"#),
            "SenderEmailAddress is required"
        );
        assert_eq!(
            msg(r#"[{"Id":"1","SenderEmailAddress":"a@b.c"}]"#),
            "BpmEndpoint is required"
        );
        assert!(
            msg(r#"[{"Id":"1","SenderEmailAddress":"a@b.c","BpmEndpoint":"http://x/Other"}]"#)
                .starts_with("BpmEndpoint must end in")
        );
        assert!(msg("{not json").starts_with("request body is not valid JSON"));
        assert!(msg("[]").contains("non-empty"));
        assert_eq!(
            msg(r#"[{"Id":{},"SenderEmailAddress":"a@b.c"}]"#),
            "Id must be a string"
        );
    }

    #[test]
    fn ids_are_bounded_printable_and_never_rounded() {
        let msg = |id: &str| {
            let body = format!(
                r#"[{{"Id":{id},"SenderEmailAddress":"a@b.c","BpmEndpoint":"http://x/NewEmail"}}]"#
            );
            parse_credentials_list(body.as_bytes()).map(|l| l[0].id.clone())
        };
        assert_eq!(
            msg(r#""m\nINFO forged line""#).unwrap_err().to_string(),
            "Id must not contain control characters"
        );
        assert_eq!(
            msg(&format!(r#""{}""#, "x".repeat(MAX_ID_CHARS + 1)))
                .unwrap_err()
                .to_string(),
            format!("Id must be at most {MAX_ID_CHARS} characters")
        );
        assert_eq!(msg("18446744073709551615").unwrap(), "18446744073709551615");
        assert!(
            msg("18446744073709551616").is_err(),
            "past 2^64 would be rounded"
        );
        assert!(msg("18446744073709551617").is_err());
        assert!(parse_ids(br#"["a\u0000b"]"#).is_err());
        assert!(parse_ids(format!(r#"["{}"]"#, "y".repeat(MAX_ID_CHARS + 1)).as_bytes()).is_err());
    }

    #[test]
    fn service_url_is_http_or_a_host_without_credentials() {
        let parse = |address: &str| {
            let body = format!(
                r#"{{"Id":"1","SenderEmailAddress":"a@b.c","BpmEndpoint":"http://x/NewEmail","ServiceUrl":"{address}"}}"#
            );
            parse_credentials_list(body.as_bytes()).map(|l| l[0].service_url.clone().unwrap())
        };
        assert_eq!(parse("mail.contoso.com").unwrap(), "mail.contoso.com");
        assert_eq!(
            parse("https://mail.contoso.com/EWS/Exchange.asmx").unwrap(),
            "https://mail.contoso.com/EWS/Exchange.asmx"
        );
        for bad in [
            "file://x",
            "gopher://mail/",
            "https://u:p@mail/EWS",
            "u:p@mail",
            "https:///EWS",
            "mail host",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("ServiceUrl "), "{bad}: {e}");
        }
    }

    #[test]
    fn mode_and_siblings_follow_the_last_segment() {
        assert_eq!(
            callback_mode("http://c/svc/NewEmail/").unwrap(),
            CallbackMode::NewEmail
        );
        assert_eq!(
            callback_mode("HTTPS://c/svc/processfullemail?x=1").unwrap(),
            CallbackMode::ProcessFullEmail
        );
        assert!(callback_mode("ftp://c/NewEmail").is_err());
        assert_eq!(
            sibling_url("http://c/svc/NewEmail", "ProcessMailboxState"),
            "http://c/svc/ProcessMailboxState"
        );
    }

    #[test]
    fn ids_and_shapes() {
        assert_eq!(parse_ids(br#"["a"," b "]"#).unwrap(), ["a", "b"]);
        assert_eq!(parse_ids(br#""a""#).unwrap(), ["a"]);
        assert!(parse_ids(br#"[1]"#).is_err());
        assert_eq!(
            body_shape(br#"[{Id:"x",Password:"secret"}]"#),
            "[{Id,Password}; 1]"
        );
        assert!(!body_shape(br#"{"p":"secret"}"#).contains("secret"));
    }

    #[test]
    fn imap_history_filters_give_their_day_and_nothing_else_passes() {
        let day = |d: &str| imap_date(d).unwrap();
        assert_eq!(day("01-Dec-2026"), 1_796_083_200_000);
        assert_eq!(day("1-dec-2026"), day("01-Dec-2026"));
        assert_eq!(
            imap_filter_since("UNDRAFT UNDELETED SENTSINCE 01-Dec-2026").unwrap(),
            Some(day("01-Dec-2026"))
        );
        assert_eq!(
            imap_filter_since("SINCE 7-Dec-2026").unwrap(),
            Some(day("07-Dec-2026"))
        );
        assert_eq!(imap_filter_since("UID 42:*").unwrap(), None);
        assert_eq!(imap_filter_since("UNKEYWORD $Synced").unwrap(), None);
        for refused in [
            "SENTSINCE yesterday",
            "SENTSINCE 31-Foo-2026",
            "UNDELETED OR FROM a b",
            "UID 1:*) (DELETE INBOX",
            "UNKEYWORD",
        ] {
            let err = imap_filter_since(refused).unwrap_err().to_string();
            assert!(err.starts_with("Filters"), "{refused}: {err}");
        }
    }
}
