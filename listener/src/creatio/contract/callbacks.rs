//! The calls the listener makes to Creatio's `ExchangeListenerService.svc`, written as
//! Creatio's WCF data contracts read them: property names exact (WCF matches them
//! case-sensitively), every property present, lists never null (Creatio throws on a null
//! `Attachments`, `Headers` or recipient list), times in .NET ticks. `NewEmail` is the one
//! wrapped, camelCase body; the others are bare.

use serde::Serialize;
use serde_json::{Value, json};

use super::Credentials;
use crate::engine::protocol::Folder;

/// .NET `DateTime` ticks (100 ns since 0001-01-01) at the Unix epoch.
const TICKS_AT_UNIX_EPOCH: i64 = 621_355_968_000_000_000;

/// .NET ticks, UTC, of a time in milliseconds since the Unix epoch: the unit of every time
/// Creatio reads from the listener.
pub fn ticks_from_unix_ms(unix_ms: i64) -> i64 {
    unix_ms
        .saturating_mul(10_000)
        .saturating_add(TICKS_AT_UNIX_EPOCH)
}

/// Milliseconds since the Unix epoch of .NET ticks, UTC (the inverse of
/// [`ticks_from_unix_ms`], to the millisecond).
pub fn unix_ms_from_ticks(ticks: i64) -> i64 {
    (ticks - TICKS_AT_UNIX_EPOCH).div_euclid(10_000)
}

/// .NET ticks, UTC, now.
pub fn ticks_now() -> i64 {
    ticks_from_unix_ms(crate::creatio::mail::unix_now_ms())
}

/// Creatio's `Importance`, written as its integer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Importance {
    None = 0,
    #[default]
    Normal = 1,
    High = 2,
    Low = 3,
}

impl Importance {
    /// From a mail's `Importance` (`high`, `normal`, `low`), Exchange's own property of that
    /// name, or `X-Priority` (1–2 high, 3 normal, 4–5 low).
    pub fn from_text(text: &str) -> Option<Importance> {
        let t = text.trim().to_ascii_lowercase();
        match t.as_str() {
            "high" | "urgent" => return Some(Importance::High),
            "normal" | "medium" => return Some(Importance::Normal),
            "low" | "non-urgent" => return Some(Importance::Low),
            _ => {}
        }
        match t.chars().next()? {
            '1' | '2' => Some(Importance::High),
            '3' => Some(Importance::Normal),
            '4' | '5' => Some(Importance::Low),
            _ => None,
        }
    }
}

impl Serialize for Importance {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(*self as u8)
    }
}

/// A file of a mail, as Creatio's `Email.Attachments` holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Attachment {
    /// The Content-ID without its angle brackets: Creatio replaces `cid:<Id>` in the body
    /// with the saved file's link. Empty for a file without one.
    pub id: String,
    pub name: String,
    pub base64_data: String,
    pub is_inline: bool,
}

/// A mail as Creatio's `Email` data contract holds it (with Creatio's spelling of
/// `Recepients`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Email {
    /// The mail server's id of the item.
    pub id: String,
    pub subject: String,
    pub body: String,
    /// `Name <address>`, or the address alone.
    pub sender: String,
    #[serde(rename = "Recepients")]
    pub recipients: Vec<String>,
    #[serde(rename = "CopyRecepients")]
    pub copy_recipients: Vec<String>,
    #[serde(rename = "BlindCopyRecepients")]
    pub blind_copy_recipients: Vec<String>,
    /// `Name=Value`, one per field of the mail's header section.
    pub headers: Vec<String>,
    pub importance: Importance,
    pub is_html_body: bool,
    pub attachments: Vec<Attachment>,
    /// .NET ticks, UTC.
    pub send_date_time_stamp: i64,
    /// With its angle brackets; Creatio's de-duplication key.
    pub message_id: String,
    pub in_reply_to: String,
    pub references: String,
}

/// The owner's workspace when Creatio names none.
const DEFAULT_WORKSPACE: &str = "Default";

/// The time zone when Creatio names none (a Windows time zone id, as Creatio's are).
const DEFAULT_TIME_ZONE: &str = "UTC";

fn workspace(creds: &Credentials) -> &str {
    creds
        .bpm_user_workspace
        .as_deref()
        .unwrap_or(DEFAULT_WORKSPACE)
}

fn time_zone(creds: &Credentials) -> &str {
    creds
        .bpm_user_time_zone
        .as_deref()
        .unwrap_or(DEFAULT_TIME_ZONE)
}

fn user(creds: &Credentials) -> &str {
    creds.bpm_user.as_deref().unwrap_or_default()
}

/// A callback's body, written once: each attempt to post it sends the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackBody(bytes::Bytes);

impl CallbackBody {
    /// `value` as JSON.
    pub fn json(value: &impl Serialize) -> Self {
        // Plain structs, strings and numbers: nothing here can fail to be written.
        let bytes = serde_json::to_vec(value).expect("a callback body is plain JSON");
        CallbackBody(bytes.into())
    }

    pub fn bytes(&self) -> &bytes::Bytes {
        &self.0
    }

    /// The body read back, for tests and fakes that look into it.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.0).unwrap_or(Value::Null)
    }
}

/// `LoadEmailCommand`, written straight from the mails (no JSON tree in between: a mail's
/// text and files are copied once, into the body).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct LoadEmailCommand<'a> {
    subscription_info: SubscriptionInfo<'a>,
    emails: &'a [Email],
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SubscriptionInfo<'a> {
    id: &'a str,
    sys_admin_unit: &'a str,
    mailbox_id: &'a str,
    workspace_name: &'a str,
    time_zone_id: &'a str,
    event_time_stamp: i64,
}

/// `ProcessFullEmail` (`LoadEmailCommand`): Creatio opens a session as `SysAdminUnit` in
/// `WorkspaceName`, checks `MailboxId` and saves each mail.
pub fn full_email_payload(creds: &Credentials, emails: &[Email], event_ticks: i64) -> CallbackBody {
    CallbackBody::json(&LoadEmailCommand {
        subscription_info: SubscriptionInfo {
            id: &creds.id,
            sys_admin_unit: user(creds),
            mailbox_id: &creds.id,
            workspace_name: workspace(creds),
            time_zone_id: time_zone(creds),
            event_time_stamp: event_ticks,
        },
        emails,
    })
}

/// `NewEmail` (`ExchangeEmailEvent`, wrapped as the parameter `newEvent`): item ids only;
/// Creatio fetches the items itself. Exchange mailboxes only.
pub fn new_email_payload(
    creds: &Credentials,
    item_ids: &[String],
    event_ticks: i64,
) -> CallbackBody {
    CallbackBody::json(&json!({
        "newEvent": {
            "uniqueIds": item_ids,
            "id": creds.id,
            "sysAdminUnit": user(creds),
            "workspaceName": workspace(creds),
            "timeZoneId": time_zone(creds),
            "eventTimeStamp": event_ticks,
        }
    }))
}

/// `RefreshToken`: asks Creatio for a fresh OAuth token, which it sends back with Update.
pub fn refresh_token_payload(creds: &Credentials) -> Value {
    json!({
        "MailboxId": creds.id,
        "SenderEmailAddress": creds.sender_email,
        "BpmUserName": user(creds),
        "BpmUserWorkspace": workspace(creds),
    })
}

/// `ProcessMailboxState` (`MailboxState`, with Creatio's spelling of `Avaliable`): `true`
/// clears the mailbox's error; otherwise Creatio matches the class name's suffix against its
/// error handlers. `Context` is what Creatio sent with the mailbox.
pub fn mailbox_state_payload(
    creds: &Credentials,
    available: bool,
    error: Option<(&str, &str)>,
) -> Value {
    json!({
        "MailboxId": creds.id,
        "SenderEmailAddress": creds.sender_email,
        "BpmUserName": user(creds),
        "BpmUserWorkspace": workspace(creds),
        "Avaliable": available,
        "ExceptionClassName": error.map_or("", |(class, _)| class),
        "ExceptionMessage": error.map_or("", |(_, msg)| msg),
        "Context": creds.context.as_deref().unwrap_or_default(),
    })
}

/// What the state call answers for one mailbox. Creatio treats exactly `exists` as alive.
pub fn state_entry(state: &str) -> Value {
    json!({ "State": state })
}

/// The answer to `mailbox/folders`: the folders of `class` (and its subclasses, such as
/// `IPF.Note.OutlookHomepage` for `IPF.Note`; every folder when none), as
/// `[{Id, Name, ParentId}]` in the server's order. A parent left out (the top of the mailbox,
/// or a folder of another class) is written as empty, so every `ParentId` names a listed folder.
pub fn folder_list(found: Vec<Folder>, class: Option<&str>) -> Vec<Value> {
    let of_class = |f: &Folder| match class {
        None => true,
        Some(c) => f.class.as_deref().is_some_and(|fc| {
            fc.eq_ignore_ascii_case(c)
                || fc
                    .get(..c.len() + 1)
                    .is_some_and(|p| p[..c.len()].eq_ignore_ascii_case(c) && p.ends_with('.'))
        }),
    };
    let kept: Vec<Folder> = found.into_iter().filter(of_class).collect();
    let ids: std::collections::HashSet<&str> = kept.iter().map(|f| f.id.as_str()).collect();
    kept.iter()
        .map(|f| {
            let parent = f
                .parent_id
                .as_deref()
                .filter(|p| ids.contains(p))
                .unwrap_or_default();
            json!({ "Id": f.id, "Name": f.name, "ParentId": parent })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_dotnet_ticks() {
        assert_eq!(ticks_from_unix_ms(0), 621_355_968_000_000_000);
        // 2024-05-01T10:00:00Z, as .NET's DateTime(2024,5,1,10,0,0).Ticks.
        assert_eq!(
            ticks_from_unix_ms(1_714_557_600_000),
            638_501_544_000_000_000
        );
    }

    #[test]
    fn importance_in_creatios_numbering() {
        assert_eq!(serde_json::to_value(Importance::None).unwrap(), json!(0));
        assert_eq!(serde_json::to_value(Importance::Low).unwrap(), json!(3));
        assert_eq!(Importance::from_text("High"), Some(Importance::High));
        assert_eq!(Importance::from_text("5 (Lowest)"), Some(Importance::Low));
        assert_eq!(Importance::from_text("3"), Some(Importance::Normal));
        assert_eq!(Importance::from_text("whatever"), None);
    }

    #[test]
    fn an_email_has_every_property_under_creatios_names() {
        let v = serde_json::to_value(Email::default()).unwrap();
        let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "Attachments",
                "BlindCopyRecepients",
                "Body",
                "CopyRecepients",
                "Headers",
                "Id",
                "Importance",
                "InReplyTo",
                "IsHtmlBody",
                "MessageId",
                "Recepients",
                "References",
                "SendDateTimeStamp",
                "Sender",
                "Subject",
            ]
        );
        assert_eq!(v["Attachments"], json!([]));
        let a = serde_json::to_value(Attachment::default()).unwrap();
        assert_eq!(
            a,
            json!({"Id": "", "Name": "", "Base64Data": "", "IsInline": false})
        );
    }

    #[test]
    fn folders_of_a_class_name_only_listed_parents() {
        let folder = |id: &str, parent: &str, name: &str, class: Option<&str>| Folder {
            id: id.into(),
            parent_id: Some(parent.into()),
            name: name.into(),
            class: class.map(str::to_owned),
        };
        let found = || {
            vec![
                folder("inbox", "root", "Inbox", Some("IPF.Note")),
                folder("projects", "inbox", "Projects", Some("IPF.Note")),
                folder(
                    "home",
                    "inbox",
                    "Home page",
                    Some("IPF.Note.OutlookHomepage"),
                ),
                folder("notes", "root", "Notes", Some("IPF.StickyNote")),
                folder("calendar", "root", "Calendar", Some("IPF.Appointment")),
                folder("in-calendar", "calendar", "Filed", Some("IPF.Note")),
                folder("search", "root", "Unread", None),
            ]
        };
        let listed = folder_list(found(), Some("IPF.Note"));
        assert_eq!(
            Value::Array(listed),
            json!([
                {"Id": "inbox", "Name": "Inbox", "ParentId": ""},
                {"Id": "projects", "Name": "Projects", "ParentId": "inbox"},
                {"Id": "home", "Name": "Home page", "ParentId": "inbox"},
                {"Id": "in-calendar", "Name": "Filed", "ParentId": ""},
            ])
        );
        assert_eq!(folder_list(found(), Some("ipf.appointment")).len(), 1);
        assert_eq!(folder_list(found(), None).len(), 7);
    }
}
