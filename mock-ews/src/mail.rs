//! The mail model: what a mailbox holds, how an injected mail becomes an RFC 5322 message
//! (plain, multipart/alternative with HTML, multipart/mixed with attachments), and seeded
//! generation of mail for batches and steady rates.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::clock;

/// A file attached to a mail.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub name: String,
    /// `application/pdf`, `text/plain`, ...
    pub content_type: String,
    /// The file's bytes, base64-encoded.
    pub content_base64: String,
    /// A Content-ID (without angle brackets): the file is shown inline where the HTML body
    /// links `cid:` to it.
    #[serde(default)]
    pub content_id: Option<String>,
}

/// A mail to put into a mailbox, as the control API and the library handle take it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NewMail {
    /// Sender SMTP address.
    pub from: String,
    pub from_name: Option<String>,
    /// Recipients; the mailbox itself when empty.
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub subject: String,
    /// Plain-text body.
    pub body: String,
    /// An HTML alternative of the body; the message becomes multipart/alternative.
    pub html: Option<String>,
    pub attachments: Vec<Attachment>,
    /// The RFC 5322 Message-ID including angle brackets; generated when absent.
    pub message_id: Option<String>,
    /// `In-Reply-To`: the Message-ID this mail answers.
    pub in_reply_to: Option<String>,
    /// `References`: the thread's Message-IDs, space-separated.
    pub references: Option<String>,
    /// `Importance`: `high`, `normal` or `low`.
    pub importance: Option<String>,
    /// When the server received it, in seconds since the Unix epoch (for mail older than the
    /// test); now when absent.
    pub received_unix: Option<i64>,
    /// The mail folder it arrives in, by name (`Inbox`, `Projects`, ...); the inbox when absent.
    pub folder: Option<String>,
}

/// A mail as the control API lists it: what the server holds, MIME in base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SentMail {
    pub item_id: String,
    pub message_id: String,
    pub subject: String,
    pub from: String,
    /// The folder holding it.
    #[serde(default)]
    pub folder: String,
    /// The RFC 5322 message exactly as GetItem serves it, base64-encoded.
    pub mime_base64: String,
}

/// A steady stream of generated mail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Mails per second (more than 0, at most 10,000).
    pub per_second: f64,
    /// For how long, in milliseconds (at most a day).
    pub duration_ms: u64,
    /// Seeds the generated mail and the choice of mailboxes.
    #[serde(default)]
    pub seed: u64,
    /// Every mail to this mailbox; to mailboxes picked at random among all when absent.
    #[serde(default)]
    pub mailbox: Option<String>,
}

impl Rate {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.per_second > 0.0 && self.per_second <= 10_000.0) {
            return Err("per_second must be more than 0 and at most 10000".into());
        }
        if self.duration_ms == 0 || self.duration_ms > 86_400_000 {
            return Err("duration_ms must be between 1 and 86400000".into());
        }
        Ok(())
    }

    /// How many mails the rate delivers in all.
    pub fn expected(&self) -> u64 {
        (self.per_second * self.duration_ms as f64 / 1000.0).floor() as u64
    }
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
    pub mail: NewMail,
    pub message_id: String,
    pub received: i64,
    pub mime: Vec<u8>,
    /// The folder holding it, by name.
    pub folder: &'static str,
}

impl Item {
    pub fn new(id: String, mailbox: &str, mut mail: NewMail) -> Item {
        let message_id = mail
            .message_id
            .take()
            .unwrap_or_else(|| format!("<{}@mock-ews.invalid>", uuid::Uuid::new_v4().simple()));
        if mail.to.is_empty() {
            mail.to = vec![mailbox.to_owned()];
        }
        let received = mail.received_unix.unwrap_or_else(clock::now_unix);
        let mime = render_mime(&id, &mail, &message_id, received);
        Item {
            id,
            change_key: "CQAAABYAAAA=".into(),
            mail,
            message_id,
            received,
            mime,
            folder: crate::folders::INBOX,
        }
    }

    pub fn summary(&self) -> SentMail {
        SentMail {
            item_id: self.id.clone(),
            message_id: self.message_id.clone(),
            subject: self.mail.subject.clone(),
            from: self.mail.from.clone(),
            folder: self.folder.to_owned(),
            mime_base64: base64::engine::general_purpose::STANDARD.encode(&self.mime),
        }
    }
}

/// A mail as a server stores it: its Message-ID, when it was received, its MIME text.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub message_id: String,
    pub received_unix: i64,
    pub mime: Vec<u8>,
}

/// Renders `mail` as delivered to `mailbox` under the item id `id` (other mock servers store
/// mail the way this one does).
pub fn render(id: &str, mailbox: &str, mail: NewMail) -> Rendered {
    let item = Item::new(id.to_owned(), mailbox, mail);
    Rendered {
        message_id: item.message_id,
        received_unix: item.received,
        mime: item.mime,
    }
}

/// CRLF line endings, as RFC 5322 requires.
fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

fn text_part(content_type: &str, text: &str) -> String {
    format!(
        "Content-Type: {content_type}; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}\r\n",
        crlf(text)
    )
}

/// The body entity: text, or multipart/alternative with an HTML part.
fn body_entity(mail: &NewMail, boundary: &str) -> String {
    match &mail.html {
        None => text_part("text/plain", &mail.body),
        Some(html) => format!(
            "Content-Type: multipart/alternative; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\n{}--{boundary}\r\n{}--{boundary}--\r\n",
            text_part("text/plain", &mail.body),
            text_part("text/html", html),
        ),
    }
}

fn render_mime(id: &str, mail: &NewMail, message_id: &str, received: i64) -> Vec<u8> {
    // Boundaries derive from the item id: the same mail always renders the same bytes.
    let tag: String = id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(24)
        .collect();
    let from = match &mail.from_name {
        Some(name) => format!("{} <{}>", display_name(name), mail.from),
        None => mail.from.clone(),
    };
    let optional = |name: &str, value: Option<&str>| {
        value.map_or(String::new(), |v| format!("{name}: {v}\r\n"))
    };
    let mut out = format!(
        "From: {from}\r\nTo: {}\r\n{}Subject: {}\r\nDate: {}\r\nMessage-ID: {message_id}\r\n{}{}{}MIME-Version: 1.0\r\n",
        mail.to.join(", "),
        if mail.cc.is_empty() {
            String::new()
        } else {
            format!("Cc: {}\r\n", mail.cc.join(", "))
        },
        encode_word(&mail.subject),
        clock::rfc5322(received),
        optional("In-Reply-To", mail.in_reply_to.as_deref()),
        optional("References", mail.references.as_deref()),
        optional("Importance", mail.importance.as_deref()),
    );
    let alternative = format!("alt-{tag}");
    if mail.attachments.is_empty() {
        out.push_str(&body_entity(mail, &alternative));
    } else {
        let mixed = format!("mixed-{tag}");
        out.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"{mixed}\"\r\n\r\n--{mixed}\r\n{}",
            body_entity(mail, &alternative)
        ));
        for a in &mail.attachments {
            let wrapped: Vec<&str> = a
                .content_base64
                .as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap_or(""))
                .collect();
            let (disposition, content_id) = match &a.content_id {
                Some(cid) => ("inline", format!("Content-ID: <{cid}>\r\n")),
                None => ("attachment", String::new()),
            };
            out.push_str(&format!(
                "--{mixed}\r\nContent-Type: {}; name=\"{}\"\r\nContent-Disposition: {disposition}; filename=\"{}\"\r\n{content_id}Content-Transfer-Encoding: base64\r\n\r\n{}\r\n",
                a.content_type,
                a.name,
                a.name,
                wrapped.join("\r\n")
            ));
        }
        out.push_str(&format!("--{mixed}--\r\n"));
    }
    out.into_bytes()
}

/// A display name as RFC 5322 writes it: an encoded word when not ASCII, quoted when it holds
/// a special character (a comma would split the address in two).
fn display_name(name: &str) -> String {
    let word = encode_word(name);
    if word == name
        && name.contains([
            '"', '\\', ',', ';', ':', '<', '>', '@', '(', ')', '[', ']', '.',
        ])
    {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        word
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

const WORDS: [&str; 16] = [
    "quarterly",
    "invoice",
    "meeting",
    "contract",
    "renewal",
    "proposal",
    "update",
    "request",
    "schedule",
    "report",
    "delivery",
    "question",
    "order",
    "review",
    "reminder",
    "offer",
];

/// Mail number `n` of the sequence `seed`: the same seed and number always give the same mail.
pub fn generated(seed: u64, n: u64) -> NewMail {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n);
    let mut words = || WORDS[rng.usize(..WORDS.len())];
    let subject = format!("{} {} {n}", words(), words());
    let body = format!(
        "Dear customer,\n\nabout the {} {}.\n\nRegards",
        words(),
        words()
    );
    let sender = rng.u32(..1000);
    NewMail {
        from: format!("sender{sender}@example.com"),
        from_name: Some(format!("Sender {sender}")),
        html: (n % 2 == 1).then(|| format!("<p>{}</p>", body.replace('\n', "<br>"))),
        subject,
        body,
        message_id: Some(format!("<seed-{seed}-{n}@mock-ews.invalid>")),
        ..NewMail::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mime(mail: NewMail) -> String {
        String::from_utf8(Item::new("aXRlbTox".into(), "alice@contoso.example", mail).mime).unwrap()
    }

    #[test]
    fn plain_mail_carries_the_headers_and_crlf_body() {
        let mime = mime(NewMail {
            from: "bob@example.com".into(),
            from_name: Some("Bob".into()),
            subject: "Grüße".into(),
            body: "line1\nline2".into(),
            message_id: Some("<m1@example.com>".into()),
            ..NewMail::default()
        });
        assert!(mime.starts_with("From: Bob <bob@example.com>\r\nTo: alice@contoso.example\r\n"));
        assert!(mime.contains("Subject: =?utf-8?B?R3LDvMOfZQ==?=\r\n"));
        assert!(mime.contains("Message-ID: <m1@example.com>\r\n"));
        assert!(mime.ends_with("\r\n\r\nline1\r\nline2\r\n"));
    }

    #[test]
    fn threads_importance_and_inline_files_are_written() {
        let mime = mime(NewMail {
            from: "bob@example.com".into(),
            html: Some("<img src=\"cid:logo\">".into()),
            in_reply_to: Some("<m0@example.com>".into()),
            references: Some("<a@example.com> <m0@example.com>".into()),
            importance: Some("high".into()),
            attachments: vec![Attachment {
                name: "logo.png".into(),
                content_type: "image/png".into(),
                content_base64: "iVBORw0K".into(),
                content_id: Some("logo".into()),
            }],
            ..NewMail::default()
        });
        assert!(mime.contains("In-Reply-To: <m0@example.com>\r\n"));
        assert!(mime.contains("References: <a@example.com> <m0@example.com>\r\n"));
        assert!(mime.contains("Importance: high\r\n"));
        assert!(mime.contains(
            "Content-Disposition: inline; filename=\"logo.png\"\r\nContent-ID: <logo>\r\n"
        ));
    }

    #[test]
    fn html_and_attachments_nest_multiparts() {
        let mime = mime(NewMail {
            from: "bob@example.com".into(),
            cc: vec!["carol@example.com".into()],
            body: "text".into(),
            html: Some("<b>html</b>".into()),
            attachments: vec![Attachment {
                name: "a.txt".into(),
                content_type: "text/plain".into(),
                content_base64: base64::engine::general_purpose::STANDARD.encode("x".repeat(100)),
                content_id: None,
            }],
            ..NewMail::default()
        });
        assert!(mime.contains("Cc: carol@example.com\r\n"));
        assert!(mime.contains("Content-Type: multipart/mixed; boundary=\"mixed-aXRlbTox\"\r\n"));
        assert!(
            mime.contains("Content-Type: multipart/alternative; boundary=\"alt-aXRlbTox\"\r\n")
        );
        assert!(mime.contains("Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n<b>html</b>\r\n"));
        assert!(mime.contains("Content-Disposition: attachment; filename=\"a.txt\"\r\n"));
        assert!(mime.trim_end().ends_with("--mixed-aXRlbTox--"));
        assert!(mime.lines().all(|l| l.len() <= 998), "RFC 5322 line limit");
    }

    #[test]
    fn generation_is_reproducible() {
        assert_eq!(generated(7, 3), generated(7, 3));
        assert_ne!(generated(7, 3), generated(8, 3));
        assert_eq!(
            generated(7, 3).message_id.as_deref(),
            Some("<seed-7-3@mock-ews.invalid>")
        );
    }
}
