//! Creatio's contract with the listener, in one place (see the project's
//! `creatio-contract.md`): the credentials object Creatio sends, the id lists, the callback
//! payloads the listener posts back, and the decisions taken where Creatio's sources are
//! silent. Property names are matched case-insensitively, as Newtonsoft does.

use std::fmt;

use serde_json::{Map, Value, json};

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Creatio's `SynchronizationCredentials`, as far as the listener uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The mailbox id (a Creatio GUID).
    pub id: String,
    pub sender_email: String,
    pub user_name: Option<String>,
    pub password: Option<Secret>,
    /// An OAuth2 bearer token, used instead of the password when present.
    pub access_token: Option<Secret>,
    /// The EWS URL, or a host to which `/EWS/Exchange.asmx` is appended.
    pub server_address: Option<String>,
    pub use_ssl: Option<bool>,
    /// Creatio's callback for this mailbox; its last segment picks the mode.
    pub bpm_endpoint: String,
    pub sys_admin_unit_name: Option<String>,
    pub time_zone_id: Option<String>,
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

fn parse_json(body: &[u8]) -> Result<Value, ContractError> {
    serde_json::from_slice(body).map_err(|e| ContractError::NotJson(e.to_string()))
}

/// The value of `name` in `obj`, matching the key case-insensitively.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn opt_string(
    obj: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, ContractError> {
    match field(obj, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        // Creatio sends GUIDs and numbers in places; accept a number where a string is due.
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(ContractError::WrongType {
            field: name,
            expected: "a string",
        }),
    }
}

fn required(obj: &Map<String, Value>, name: &'static str) -> Result<String, ContractError> {
    opt_string(obj, name)?.ok_or(ContractError::Missing(name))
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
        required(obj, "Id")?
    } else {
        opt_string(obj, "Id")?.unwrap_or_default()
    };
    let sender_email = required(obj, "SenderEmailAddress")?;
    if !sender_email.contains('@') {
        return Err(ContractError::Invalid {
            field: "SenderEmailAddress",
            reason: "must be an email address".into(),
        });
    }
    let bpm_endpoint = if subscription {
        let url = required(obj, "BpmEndpoint")?;
        callback_mode(&url)?;
        url
    } else {
        opt_string(obj, "BpmEndpoint")?.unwrap_or_default()
    };
    Ok(Credentials {
        id,
        sender_email,
        user_name: opt_string(obj, "UserName")?,
        password: opt_string(obj, "UserPassword")?.map(Secret),
        access_token: opt_string(obj, "AccessToken")?.map(Secret),
        server_address: opt_string(obj, "ServerAddress")?,
        use_ssl: opt_bool(obj, "UseSSL")?,
        bpm_endpoint,
        sys_admin_unit_name: opt_string(obj, "SysAdminUnitName")?,
        time_zone_id: opt_string(obj, "TimeZoneId")?,
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

/// Close/SubscriptionsState: an array of mailbox ids, or one bare id.
pub fn parse_ids(body: &[u8]) -> Result<Vec<String>, ContractError> {
    let as_id = |v: &Value| match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
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
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => shape(&v),
        Err(_) if body.is_empty() => "empty".into(),
        Err(_) => format!("non-JSON, {} bytes", body.len()),
    }
}

/// What the state call answers for one mailbox. Creatio treats exactly `exists` as alive.
pub fn state_entry(state: &str) -> Value {
    json!({ "State": state })
}

/// A mail as it is handed to Creatio in `ProcessFullEmail`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Email {
    pub item_id: String,
    pub message_id: String,
    pub subject: String,
    pub sender: String,
    pub sender_name: Option<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub body: String,
    pub is_html: bool,
    pub importance: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub sent_unix_ms: Option<i64>,
    pub received_unix_ms: Option<i64>,
}

/// Decision: `ProcessFullEmail` carries `SubscriptionInfo` and an `Emails` array whose items
/// use Creatio's email field names; timestamps are Unix milliseconds.
pub fn full_email_payload(creds: &Credentials, emails: &[Email]) -> Value {
    json!({
        "SubscriptionInfo": {
            "Id": creds.id,
            "MailboxId": creds.id,
            "SenderEmailAddress": creds.sender_email,
            "SysAdminUnit": creds.sys_admin_unit_name,
            "TimeZoneId": creds.time_zone_id,
        },
        "Emails": emails.iter().map(|e| json!({
            "Id": e.item_id,
            "MessageId": e.message_id,
            "Subject": e.subject,
            "Sender": e.sender,
            "SenderName": e.sender_name,
            "To": e.to,
            "Copy": e.cc,
            "Body": e.body,
            "IsHtmlBody": e.is_html,
            "Importance": e.importance,
            "SendDateTimeStamp": e.sent_unix_ms,
            "ReceiveDateTimeStamp": e.received_unix_ms,
        })).collect::<Vec<_>>(),
    })
}

/// `NewEmail`: the legacy wrapped body with item ids only.
pub fn new_email_payload(creds: &Credentials, item_ids: &[String], event_unix_ms: i64) -> Value {
    json!({
        "newEvent": {
            "Id": creds.id,
            "UniqueIds": item_ids,
            "EventTimeStamp": event_unix_ms,
            "SysAdminUnitName": creds.sys_admin_unit_name,
            "TimeZoneId": creds.time_zone_id,
        }
    })
}

/// `ProcessMailboxState`, with Creatio's own spelling of `Avaliable`.
pub fn mailbox_state_payload(
    creds: &Credentials,
    available: bool,
    error: Option<(&str, &str)>,
) -> Value {
    json!({
        "SenderEmailAddress": creds.sender_email,
        "Avaliable": available,
        "ExceptionClassName": error.map(|(class, _)| class),
        "ExceptionMessage": error.map(|(_, msg)| msg),
        "Context": creds.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"id":"m1","SENDEREMAILADDRESS":"a@b.c","UserPassword":"pw","BpmEndpoint":"https://crm/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail","Unknown":1}"#;

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
            body_shape(br#"[{"Id":"x","UserPassword":"secret"}]"#),
            "[{Id,UserPassword}; 1]"
        );
        assert!(!body_shape(br#"{"p":"secret"}"#).contains("secret"));
    }
}
