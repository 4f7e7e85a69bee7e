//! Creatio's `email/send` (`/apiv2/email/send`, and v1's `/api/email/send`):
//! `SendCommand{Email, Attachments, Credentials}`. Version 2 carries the attachments inside
//! `Email`, version 1 beside it. The mail is read into [`OutgoingEmail`], which knows no mail
//! protocol; each protocol turns it into what its server takes.

use serde_json::{Map, Value};

use super::{
    ContractError, Credentials, MAX_ID_CHARS, Purpose, checked, credentials_from, field, opt_bool,
    opt_int, opt_string_of,
};

/// How important a mail is, as a mail server is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Importance {
    Low,
    Normal,
    High,
}

/// A recipient: the address and, when Creatio gave one, the name shown with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub name: Option<String>,
    pub email: String,
}

/// A file sent with a mail, its content still base64 as Creatio encoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingAttachment {
    pub name: String,
    /// The Content-ID an HTML body links as `cid:<id>`, for a file shown inline.
    pub content_id: Option<String>,
    pub is_inline: bool,
    pub content_base64: String,
}

/// A mail Creatio asks to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingEmail {
    pub subject: String,
    pub body: String,
    pub is_html: bool,
    /// `None` when Creatio left it unset.
    pub importance: Option<Importance>,
    pub to: Vec<Address>,
    pub cc: Vec<Address>,
    pub bcc: Vec<Address>,
    /// With its angle brackets: the Message-ID Creatio chose, which the mail keeps.
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: Option<String>,
    pub attachments: Vec<OutgoingAttachment>,
}

impl OutgoingEmail {
    /// The attachments' size once decoded, in bytes.
    pub fn attachment_bytes(&self) -> usize {
        self.attachments
            .iter()
            .map(|a| {
                let padding = a.content_base64.len() - a.content_base64.trim_end_matches('=').len();
                a.content_base64.len() / 4 * 3 - padding
            })
            .sum()
    }
}

/// A send Creatio asked for.
#[derive(Debug)]
pub struct SendCommand {
    pub creds: Credentials,
    pub email: OutgoingEmail,
    /// What a retry of the same mail is known by: its Message-ID, else Creatio's id of it.
    pub key: String,
}

/// The longest subject accepted.
const MAX_SUBJECT_CHARS: usize = 4_096;

/// The longest Message-ID, and the longest `References` (a long thread's ids).
const MAX_MESSAGE_ID_CHARS: usize = 998;
const MAX_REFERENCES_CHARS: usize = 64 * 1024;

/// The most recipients in all, and the most attachments, one mail may have.
const MAX_RECIPIENTS: usize = 5_000;
const MAX_ATTACHMENTS: usize = 500;

/// Reads a `SendCommand`.
pub fn parse_send(body: &[u8]) -> Result<SendCommand, ContractError> {
    let Value::Object(command) = super::parse_json(body)? else {
        return Err(ContractError::Shape("a SendCommand object"));
    };
    let creds = match field(&command, "Credentials") {
        Some(c @ Value::Object(_)) => credentials_from(c, Purpose::Validation)?,
        _ => {
            return Err(ContractError::Invalid {
                field: "Credentials",
                reason: "must be the sending mailbox's credentials object".into(),
            });
        }
    };
    let Some(Value::Object(email)) = field(&command, "Email") else {
        return Err(ContractError::Invalid {
            field: "Email",
            reason: "must be the mail to send".into(),
        });
    };
    // Version 2 carries the attachments in the mail; version 1 beside it.
    let mut files = attachments(field(email, "Attachments"))?;
    if files.is_empty() {
        files = attachments(field(&command, "Attachments"))?;
    }
    let message_id = opt_string_of(email, &["MessageId"], MAX_MESSAGE_ID_CHARS)?.map(|id| {
        if id.starts_with('<') {
            id
        } else {
            format!("<{id}>")
        }
    });
    let creatio_id = opt_string_of(email, &["Id"], MAX_ID_CHARS)?;
    let key = match (&message_id, creatio_id) {
        (Some(id), _) => id.clone(),
        (None, Some(id)) => id,
        (None, None) => {
            return Err(ContractError::Invalid {
                field: "Email.MessageId",
                reason: "or Email.Id is required: a retry of the mail is known by it".into(),
            });
        }
    };
    let email = OutgoingEmail {
        subject: opt_string_of(email, &["Subject"], MAX_SUBJECT_CHARS)?.unwrap_or_default(),
        body: body_text(email)?,
        is_html: opt_bool(email, "IsHtmlBody")?.unwrap_or(false),
        importance: importance(email)?,
        to: recipients(email, "Recepients")?,
        cc: recipients(email, "CopyRecepients")?,
        bcc: recipients(email, "BlindCopyRecepients")?,
        message_id,
        in_reply_to: opt_string_of(email, &["InReplyTo"], MAX_MESSAGE_ID_CHARS)?,
        references: opt_string_of(email, &["References"], MAX_REFERENCES_CHARS)?,
        attachments: files,
    };
    let recipients = email.to.len() + email.cc.len() + email.bcc.len();
    if recipients == 0 {
        return Err(ContractError::Invalid {
            field: "Email.Recepients",
            reason:
                "must name at least one recipient (with CopyRecepients and BlindCopyRecepients)"
                    .into(),
        });
    }
    if recipients > MAX_RECIPIENTS {
        return Err(ContractError::Invalid {
            field: "Email.Recepients",
            reason: format!("must name at most {MAX_RECIPIENTS} recipients in all"),
        });
    }
    Ok(SendCommand { creds, email, key })
}

/// `Body`: any text, control characters (line breaks, tabs) included.
fn body_text(email: &Map<String, Value>) -> Result<String, ContractError> {
    match field(email, "Body") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ContractError::WrongType {
            field: "Email.Body",
            expected: "a string",
        }),
    }
}

/// `Importance`: None 0, Normal 1, High 2, Low 3 (or the name).
fn importance(email: &Map<String, Value>) -> Result<Option<Importance>, ContractError> {
    if let Some(Value::String(s)) = field(email, "Importance") {
        return match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(None),
            "normal" => Ok(Some(Importance::Normal)),
            "high" => Ok(Some(Importance::High)),
            "low" => Ok(Some(Importance::Low)),
            _ if s.trim().parse::<i64>().is_ok() => importance_number(email),
            _ => Err(ContractError::Invalid {
                field: "Importance",
                reason: "must be 0 to 3 or None, Normal, High, Low".into(),
            }),
        };
    }
    importance_number(email)
}

fn importance_number(email: &Map<String, Value>) -> Result<Option<Importance>, ContractError> {
    Ok(match opt_int(email, "Importance", 0..=3)? {
        None | Some(0) => None,
        Some(1) => Some(Importance::Normal),
        Some(2) => Some(Importance::High),
        Some(_) => Some(Importance::Low),
    })
}

/// A recipient list: strings, each `Name <address>` or an address, possibly several joined by
/// `;`. Null is the empty list.
fn recipients(
    email: &Map<String, Value>,
    name: &'static str,
) -> Result<Vec<Address>, ContractError> {
    let wrong = ContractError::WrongType {
        field: name,
        expected: "an array of strings",
    };
    let items = match field(email, name) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(Value::String(s)) => return split_addresses(name, s),
        Some(_) => return Err(wrong),
    };
    let mut out = Vec::new();
    for item in items {
        let Value::String(s) = item else {
            return Err(wrong);
        };
        out.extend(split_addresses(name, s)?);
        if out.len() > MAX_RECIPIENTS {
            break;
        }
    }
    Ok(out)
}

fn split_addresses(field: &'static str, s: &str) -> Result<Vec<Address>, ContractError> {
    s.split(';')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| address(field, part))
        .collect()
}

/// `Name <address>`, `"Name" <address>` or a bare address.
fn address(field: &'static str, text: &str) -> Result<Address, ContractError> {
    checked(field, text, MAX_ID_CHARS)?;
    let (name, email) = match (text.rfind('<'), text.ends_with('>')) {
        (Some(open), true) => {
            let name = text[..open].trim().trim_matches('"').trim();
            (
                (!name.is_empty()).then(|| name.to_owned()),
                text[open + 1..text.len() - 1].trim(),
            )
        }
        _ => (None, text),
    };
    let at = email.find('@');
    if !at.is_some_and(|i| i > 0 && i + 1 < email.len()) || email.contains(char::is_whitespace) {
        return Err(ContractError::Invalid {
            field,
            reason: format!("must hold email addresses; {text:?} is not one"),
        });
    }
    Ok(Address {
        name,
        email: email.to_owned(),
    })
}

/// `Attachments`: `[{Id, Name, Base64Data, IsInline}]`; null is none.
fn attachments(value: Option<&Value>) -> Result<Vec<OutgoingAttachment>, ContractError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() > MAX_ATTACHMENTS => {
            return Err(ContractError::Invalid {
                field: "Attachments",
                reason: format!("must have at most {MAX_ATTACHMENTS} files"),
            });
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "Attachments",
                expected: "an array of attachment objects",
            });
        }
    };
    items
        .iter()
        .map(|item| {
            let Value::Object(a) = item else {
                return Err(ContractError::WrongType {
                    field: "Attachments",
                    expected: "an array of attachment objects",
                });
            };
            let content = match field(a, "Base64Data") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => {
                    return Err(ContractError::WrongType {
                        field: "Attachments.Base64Data",
                        expected: "a base64 string",
                    });
                }
            };
            if !is_base64(&content) {
                return Err(ContractError::Invalid {
                    field: "Attachments.Base64Data",
                    reason: "must be base64".into(),
                });
            }
            let is_inline = opt_bool(a, "IsInline")?.unwrap_or(false);
            let id = opt_string_of(a, &["Id"], MAX_ID_CHARS)?
                .map(|id| id.trim_matches(['<', '>']).to_owned());
            Ok(OutgoingAttachment {
                name: opt_string_of(a, &["Name"], MAX_ID_CHARS)?
                    .unwrap_or_else(|| "attachment".into()),
                content_id: id.filter(|_| is_inline),
                is_inline,
                content_base64: content,
            })
        })
        .collect()
}

/// Standard base64, padded, without line breaks (as .NET's `Convert.ToBase64String` writes).
fn is_base64(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    s.len().is_multiple_of(4)
        && s.len() - body.len() <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(email: &str) -> String {
        format!(
            r#"{{"Email":{email},"Attachments":null,"Credentials":{{"SenderEmailAddress":"alice@contoso.example","UserName":"alice","Password":"pw","ServiceUrl":"https://mail.contoso.example/EWS/Exchange.asmx"}}}}"#
        )
    }

    #[test]
    fn reads_a_version_2_command_as_creatio_writes_it() {
        let body = command(
            r#"{"Id":"9c1d…","Subject":"Offer","Body":"<p>see <img src=\"cid:logo\"></p>\r\n","IsHtmlBody":true,
               "Sender":"alice@contoso.example","Recepients":["Bob <bob@contoso.example>","carol@contoso.example; \"Dan D\" <dan@contoso.example>"],
               "CopyRecepients":[],"BlindCopyRecepients":null,"Importance":2,"Headers":[],
               "MessageId":"offer-1@creatio.example","InReplyTo":"<q@contoso.example>","References":"<q@contoso.example>",
               "Attachments":[{"Id":"logo","Name":"logo.png","Base64Data":"iVBORw0KGgo=","IsInline":true},
                              {"Id":"8d2f","Name":"offer.pdf","Base64Data":"JVBERi0=","IsInline":false}],
               "SendDateTimeStamp":638500000000000000}"#,
        );
        let send = parse_send(body.as_bytes()).unwrap();
        let email = &send.email;
        assert_eq!(send.key, "<offer-1@creatio.example>");
        assert_eq!(
            email.message_id.as_deref(),
            Some("<offer-1@creatio.example>")
        );
        assert!(email.is_html);
        assert!(email.body.ends_with("\r\n"));
        assert_eq!(email.importance, Some(Importance::High));
        let to: Vec<(Option<&str>, &str)> = email
            .to
            .iter()
            .map(|a| (a.name.as_deref(), a.email.as_str()))
            .collect();
        assert_eq!(
            to,
            [
                (Some("Bob"), "bob@contoso.example"),
                (None, "carol@contoso.example"),
                (Some("Dan D"), "dan@contoso.example")
            ]
        );
        assert!(email.cc.is_empty() && email.bcc.is_empty());
        assert_eq!(email.attachments.len(), 2);
        assert_eq!(email.attachments[0].content_id.as_deref(), Some("logo"));
        assert_eq!(email.attachments[1].content_id, None);
        assert_eq!(email.attachment_bytes(), 8 + 5);
    }

    #[test]
    fn reads_version_1s_attachments_beside_the_mail() {
        let body = r#"{"Email":{"Id":"a1","Subject":"s","Recepients":["bob@contoso.example"]},"Attachments":[{"Name":"a.txt","Base64Data":"aGk=","IsInline":false}],"Credentials":{"SenderEmailAddress":"alice@contoso.example"}}"#;
        let send = parse_send(body.as_bytes()).unwrap();
        assert_eq!(send.key, "a1");
        assert_eq!(send.email.message_id, None);
        assert_eq!(send.email.attachments[0].name, "a.txt");
        assert_eq!(send.email.importance, None);
    }

    #[test]
    fn names_the_field_it_refuses() {
        let refused = |email: &str| {
            parse_send(command(email).as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert!(refused(r#"{"Id":"x","Recepients":[]}"#).contains("Email.Recepients"));
        assert!(refused(r#"{"Id":"x","Recepients":["not an address"]}"#).contains("Recepients"));
        assert!(refused(r#"{"Recepients":["b@c.d"]}"#).contains("Email.MessageId"));
        assert!(
            refused(r#"{"Id":"x","Recepients":["b@c.d"],"Attachments":[{"Name":"a","Base64Data":"%%%"}]}"#)
                .contains("Attachments.Base64Data")
        );
        assert!(
            refused(r#"{"Id":"x","Recepients":["b@c.d"],"Importance":7}"#).contains("Importance")
        );
        let no_creds = parse_send(br#"{"Email":{"Id":"x","Recepients":["b@c.d"]}}"#).unwrap_err();
        assert!(no_creds.to_string().contains("Credentials"));
        // A password is never echoed in an error.
        let bad = br#"{"Email":{"Id":"x"},"Credentials":{"SenderEmailAddress":"nope","Password":"hunter2"}}"#;
        assert!(!parse_send(bad).unwrap_err().to_string().contains("hunter2"));
    }
}
