//! Each callback read as Creatio's WCF service reads it, and stricter where that catches a
//! drift early: member names exact (WCF matches them case-sensitively), every member of the
//! data contract present, none it does not have, types exact (an integer is no string), the
//! lists Creatio iterates never null, times in .NET ticks (a Unix time is refused), base64
//! that decodes. A body that fails is refused with `400` and the reason, and recorded.

use serde_json::{Map, Value};

/// The type of one data-contract member.
#[derive(Debug, Clone, Copy)]
enum Ty {
    /// A string, or null (WCF reads null into a string).
    Str,
    /// A string that must not be null or empty (`MessageId`: Creatio skips a mail without it).
    Required,
    Bool,
    /// An integer within the range.
    Int(i64, i64),
    /// .NET `DateTime` ticks: an integer between the years 1900 and 3000.
    Ticks,
    /// A string of base64.
    Base64,
    /// A non-null array.
    List(&'static Ty),
    /// A nested data contract.
    Contract(&'static [(&'static str, Ty)]),
}

/// Ticks of 1900-01-01 and 3000-01-01: a time Creatio could mean.
const TICKS_1900: i64 = 599_266_080_000_000_000;
const TICKS_3000: i64 = 946_080_000_000_000_000;

const ATTACHMENT: &[(&str, Ty)] = &[
    ("Id", Ty::Str),
    ("Name", Ty::Str),
    ("Base64Data", Ty::Base64),
    ("IsInline", Ty::Bool),
];

const EMAIL: &[(&str, Ty)] = &[
    ("Id", Ty::Str),
    ("Subject", Ty::Str),
    ("Body", Ty::Str),
    ("Sender", Ty::Str),
    ("Recepients", Ty::List(&Ty::Str)),
    ("CopyRecepients", Ty::List(&Ty::Str)),
    ("BlindCopyRecepients", Ty::List(&Ty::Str)),
    ("Headers", Ty::List(&Ty::Str)),
    ("Importance", Ty::Int(0, 3)),
    ("IsHtmlBody", Ty::Bool),
    ("Attachments", Ty::List(&Ty::Contract(ATTACHMENT))),
    ("SendDateTimeStamp", Ty::Ticks),
    ("MessageId", Ty::Required),
    ("InReplyTo", Ty::Str),
    ("References", Ty::Str),
];

const SUBSCRIPTION_INFO: &[(&str, Ty)] = &[
    ("Id", Ty::Required),
    ("SysAdminUnit", Ty::Str),
    ("MailboxId", Ty::Required),
    ("WorkspaceName", Ty::Str),
    ("TimeZoneId", Ty::Str),
    ("EventTimeStamp", Ty::Ticks),
];

/// `ProcessFullEmail`'s `LoadEmailCommand`, bare.
const LOAD_EMAIL_COMMAND: &[(&str, Ty)] = &[
    ("SubscriptionInfo", Ty::Contract(SUBSCRIPTION_INFO)),
    ("Emails", Ty::List(&Ty::Contract(EMAIL))),
];

const EXCHANGE_EMAIL_EVENT: &[(&str, Ty)] = &[
    ("uniqueIds", Ty::List(&Ty::Required)),
    ("id", Ty::Required),
    ("sysAdminUnit", Ty::Str),
    ("workspaceName", Ty::Str),
    ("timeZoneId", Ty::Str),
    ("eventTimeStamp", Ty::Ticks),
];

/// `NewEmail`, wrapped: the parameter `newEvent`.
const NEW_EMAIL: &[(&str, Ty)] = &[("newEvent", Ty::Contract(EXCHANGE_EMAIL_EVENT))];

const MAILBOX_STATE: &[(&str, Ty)] = &[
    ("MailboxId", Ty::Required),
    ("SenderEmailAddress", Ty::Str),
    ("BpmUserName", Ty::Str),
    ("BpmUserWorkspace", Ty::Str),
    ("Avaliable", Ty::Bool),
    ("ExceptionClassName", Ty::Str),
    ("ExceptionMessage", Ty::Str),
    ("Context", Ty::Str),
];

const REFRESH_TOKEN: &[(&str, Ty)] = &[
    ("MailboxId", Ty::Required),
    ("SenderEmailAddress", Ty::Str),
    ("BpmUserName", Ty::Str),
    ("BpmUserWorkspace", Ty::Str),
];

/// Reads `body` as Creatio reads `operation`'s parameter; the reason when it cannot.
pub fn read(operation: &str, body: &Value) -> Result<(), String> {
    let contract = match operation {
        "ProcessFullEmail" => LOAD_EMAIL_COMMAND,
        "NewEmail" => NEW_EMAIL,
        "ProcessMailboxState" => MAILBOX_STATE,
        "RefreshToken" => REFRESH_TOKEN,
        other => return Err(format!("no operation {other}")),
    };
    check(operation, &Ty::Contract(contract), body)
}

fn check(path: &str, ty: &Ty, v: &Value) -> Result<(), String> {
    let wrong = |what: &str| Err(format!("{path} must be {what}, not {v}"));
    match ty {
        Ty::Str => match v {
            Value::String(_) | Value::Null => Ok(()),
            _ => wrong("a string"),
        },
        Ty::Required => match v {
            Value::String(s) if !s.is_empty() => Ok(()),
            _ => wrong("a non-empty string"),
        },
        Ty::Bool => match v {
            Value::Bool(_) => Ok(()),
            _ => wrong("true or false"),
        },
        Ty::Int(lo, hi) => match v.as_i64() {
            Some(n) if v.is_number() && (*lo..=*hi).contains(&n) => Ok(()),
            _ => wrong(&format!("an integer from {lo} to {hi}")),
        },
        Ty::Ticks => match v.as_i64() {
            Some(n) if v.is_number() && (TICKS_1900..TICKS_3000).contains(&n) => Ok(()),
            _ => wrong(".NET DateTime ticks (an integer of 18 digits)"),
        },
        Ty::Base64 => match v {
            Value::String(s) if is_base64(s) => Ok(()),
            _ => wrong("base64"),
        },
        Ty::List(item) => match v {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, x)| check(&format!("{path}[{i}]"), item, x)),
            Value::Null => Err(format!(
                "{path} is null: Creatio throws on a null list; send []"
            )),
            _ => wrong("an array"),
        },
        Ty::Contract(members) => match v {
            Value::Object(obj) => check_members(path, members, obj),
            _ => wrong("an object"),
        },
    }
}

fn check_members(
    path: &str,
    members: &[(&str, Ty)],
    obj: &Map<String, Value>,
) -> Result<(), String> {
    for (name, ty) in members {
        match obj.get(*name) {
            Some(v) => check(&format!("{path}.{name}"), ty, v)?,
            None => {
                return Err(match obj.keys().find(|k| k.eq_ignore_ascii_case(name)) {
                    Some(k) => format!(
                        "{path}.{name} is written {k:?}: WCF matches member names case-sensitively"
                    ),
                    None => format!("{path}.{name} is missing"),
                });
            }
        }
    }
    match obj.keys().find(|k| !members.iter().any(|(n, _)| n == k)) {
        Some(extra) => Err(format!(
            "{path}.{extra} is not a member of Creatio's data contract"
        )),
        None => Ok(()),
    }
}

fn is_base64(s: &str) -> bool {
    let b = s.as_bytes();
    b.len().is_multiple_of(4)
        && b.iter().enumerate().all(|(i, &c)| {
            c.is_ascii_alphanumeric()
                || c == b'+'
                || c == b'/'
                || (c == b'=' && i + 2 >= b.len() && b[i..].iter().all(|&r| r == b'='))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn email() -> Value {
        json!({
            "Id": "AAMk", "Subject": "s", "Body": "b", "Sender": "a <a@b.c>",
            "Recepients": ["x@y.z"], "CopyRecepients": [], "BlindCopyRecepients": [],
            "Headers": ["From=a@b.c"], "Importance": 1, "IsHtmlBody": false,
            "Attachments": [{"Id": "", "Name": "a.txt", "Base64Data": "aGk=", "IsInline": false}],
            "SendDateTimeStamp": 638_501_544_000_000_000_i64, "MessageId": "<m@b.c>",
            "InReplyTo": "", "References": "",
        })
    }

    fn full(email: Value) -> Value {
        json!({
            "SubscriptionInfo": {"Id": "m", "SysAdminUnit": "Supervisor", "MailboxId": "m",
                "WorkspaceName": "Default", "TimeZoneId": "UTC",
                "EventTimeStamp": 638_501_544_000_000_000_i64},
            "Emails": [email],
        })
    }

    #[test]
    fn a_full_email_as_creatio_reads_it() {
        read("ProcessFullEmail", &full(email())).unwrap();
    }

    #[test]
    fn every_drift_is_refused_with_its_reason() {
        let refused = |change: &dyn Fn(&mut Value)| {
            let mut e = email();
            change(&mut e);
            read("ProcessFullEmail", &full(e)).unwrap_err()
        };
        assert_eq!(
            refused(&|e| e["Attachments"] = Value::Null),
            "ProcessFullEmail.Emails[0].Attachments is null: Creatio throws on a null list; send []"
        );
        assert!(
            refused(&|e| e["SendDateTimeStamp"] = json!(1_714_557_600_000_i64)).contains("ticks")
        );
        assert!(
            refused(&|e| {
                e.as_object_mut().unwrap().remove("Headers");
            })
            .ends_with("Headers is missing")
        );
        assert!(
            refused(&|e| {
                let v = e.as_object_mut().unwrap().remove("MessageId").unwrap();
                e["messageId"] = v;
            })
            .contains("case-sensitively")
        );
        assert!(refused(&|e| e["To"] = json!([])).contains("not a member"));
        assert!(refused(&|e| e["Importance"] = json!("High")).contains("integer"));
        assert!(refused(&|e| e["MessageId"] = json!("")).contains("non-empty"));
        assert!(
            refused(&|e| e["Attachments"][0]["Base64Data"] = json!("not base64!"))
                .contains("base64")
        );
    }

    #[test]
    fn the_other_operations() {
        read(
            "NewEmail",
            &json!({"newEvent": {"uniqueIds": ["AAMk"], "id": "m", "sysAdminUnit": "S",
                "workspaceName": "Default", "timeZoneId": "UTC",
                "eventTimeStamp": 638_501_544_000_000_000_i64}}),
        )
        .unwrap();
        assert!(read("NewEmail", &json!({"newEvent": {"UniqueIds": []}})).is_err());
        read(
            "ProcessMailboxState",
            &json!({"MailboxId": "m", "SenderEmailAddress": "a@b.c", "BpmUserName": "S",
                "BpmUserWorkspace": "Default", "Avaliable": true, "ExceptionClassName": "",
                "ExceptionMessage": "", "Context": ""}),
        )
        .unwrap();
        assert!(
            read(
                "ProcessMailboxState",
                &json!({"SenderEmailAddress": "a@b.c"})
            )
            .is_err()
        );
        read(
            "RefreshToken",
            &json!({"MailboxId": "m", "SenderEmailAddress": "a@b.c", "BpmUserName": "S",
                "BpmUserWorkspace": "Default"}),
        )
        .unwrap();
    }

    #[test]
    fn base64_is_checked() {
        assert!(is_base64("") && is_base64("aGk=") && is_base64("aGVsbG8h"));
        assert!(!is_base64("aGk") && !is_base64("a=Gk") && !is_base64("aG k"));
    }
}
