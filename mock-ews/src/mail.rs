//! The mail model: what a mailbox holds and how an injected mail becomes an RFC 5322 message.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::clock;

/// A mail to put into a mailbox, as the control API and the library handle take it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NewMail {
    /// Sender SMTP address.
    pub from: String,
    pub from_name: Option<String>,
    /// Recipients; the mailbox itself when empty.
    pub to: Vec<String>,
    pub subject: String,
    /// Plain-text body.
    pub body: String,
    /// The RFC 5322 Message-ID including angle brackets; generated when absent.
    pub message_id: Option<String>,
}

/// A mail as the control API lists it: what the server holds, MIME in base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SentMail {
    pub item_id: String,
    pub message_id: String,
    pub subject: String,
    pub from: String,
    /// The RFC 5322 message exactly as GetItem serves it, base64-encoded.
    pub mime_base64: String,
}

/// What the server assigned to an injected mail.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InjectedMail {
    pub item_id: String,
    pub message_id: String,
}

/// A message stored in a mailbox's inbox.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub id: String,
    pub change_key: String,
    pub subject: String,
    pub from_name: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    pub body: String,
    pub message_id: String,
    pub received: i64,
    pub mime: Vec<u8>,
}

impl Item {
    pub fn new(id: String, mailbox: &str, mail: NewMail) -> Item {
        let now = clock::now_unix();
        let message_id = mail
            .message_id
            .unwrap_or_else(|| format!("<{}@mock-ews.invalid>", uuid::Uuid::new_v4().simple()));
        let to = if mail.to.is_empty() {
            vec![mailbox.to_owned()]
        } else {
            mail.to
        };
        let mut item = Item {
            id,
            change_key: "CQAAABYAAAA=".into(),
            subject: mail.subject,
            from_name: mail.from_name,
            from: mail.from,
            to,
            body: mail.body,
            message_id,
            received: now,
            mime: Vec::new(),
        };
        item.mime = item.render_mime();
        item
    }

    pub fn summary(&self) -> SentMail {
        SentMail {
            item_id: self.id.clone(),
            message_id: self.message_id.clone(),
            subject: self.subject.clone(),
            from: self.from.clone(),
            mime_base64: base64::engine::general_purpose::STANDARD.encode(&self.mime),
        }
    }

    fn render_mime(&self) -> Vec<u8> {
        let from = match &self.from_name {
            Some(name) => format!("{} <{}>", encode_word(name), self.from),
            None => self.from.clone(),
        };
        let body = self.body.replace("\r\n", "\n").replace('\n', "\r\n");
        format!(
            "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: {mid}\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n{body}\r\n",
            to = self.to.join(", "),
            subject = encode_word(&self.subject),
            date = clock::rfc5322(self.received),
            mid = self.message_id,
        )
        .into_bytes()
    }
}

/// An RFC 2047 encoded word for header text that is not plain printable ASCII.
fn encode_word(text: &str) -> String {
    if text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        text.to_owned()
    } else {
        format!(
            "=?utf-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(text)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_carries_the_headers_and_crlf_body() {
        let item = Item::new(
            "id1".into(),
            "alice@contoso.example",
            NewMail {
                from: "bob@example.com".into(),
                from_name: Some("Bob".into()),
                subject: "Grüße".into(),
                body: "line1\nline2".into(),
                message_id: Some("<m1@example.com>".into()),
                ..NewMail::default()
            },
        );
        let mime = String::from_utf8(item.mime).unwrap();
        assert!(mime.starts_with("From: Bob <bob@example.com>\r\nTo: alice@contoso.example\r\n"));
        assert!(mime.contains("Subject: =?utf-8?B?R3LDvMOfZQ==?=\r\n"));
        assert!(mime.contains("Message-ID: <m1@example.com>\r\n"));
        assert!(mime.ends_with("\r\n\r\nline1\r\nline2\r\n"));
    }
}
