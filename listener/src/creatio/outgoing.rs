//! A mail Creatio sends, as the MIME text SMTP and Graph's `sendMail` carry: its recipients,
//! subject, HTML or text body with its inline images (`multipart/related`, by Content-ID), its
//! files, importance and thread headers, and Creatio's Message-ID.

use base64::Engine as _;
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};

use crate::creatio::contract::send::{Address, Importance, OutgoingEmail};

/// What a mail asks of SMTP: its MIME text and its envelope.
#[derive(Debug)]
pub(crate) struct Submission {
    pub from: String,
    pub recipients: Vec<String>,
    pub message: Vec<u8>,
}

/// `Importance:` (RFC 2156), as mail clients read it.
#[derive(Debug, Clone)]
struct ImportanceHeader(&'static str);

impl Header for ImportanceHeader {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Importance")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ImportanceHeader(
            match s.trim().to_ascii_lowercase().as_str() {
                "high" => "high",
                "low" => "low",
                _ => "normal",
            },
        ))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.to_owned())
    }
}

fn mailbox(field: &str, a: &Address) -> Result<Mailbox, String> {
    let address = a
        .email
        .parse()
        .map_err(|_| format!("{field} {:?} is not an email address", a.email))?;
    Ok(Mailbox::new(a.name.clone(), address))
}

/// The content type a file's name suggests; bytes otherwise.
fn content_type(name: &str) -> ContentType {
    let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    let mime = match extension.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("svg") => "image/svg+xml",
        Some("pdf") => "application/pdf",
        Some("txt") => "text/plain",
        Some("htm" | "html") => "text/html",
        _ => "application/octet-stream",
    };
    ContentType::parse(mime).unwrap_or(ContentType::TEXT_PLAIN)
}

/// The MIME text and envelope of `email` sent by `sender`; an error names what cannot be
/// written (an address that is not one).
pub(crate) fn submission(sender: &str, email: &OutgoingEmail) -> Result<Submission, String> {
    let from: Mailbox = sender
        .parse()
        .map_err(|_| format!("SenderEmailAddress {sender:?} is not an email address"))?;
    let mut builder = lettre::Message::builder()
        .from(from)
        .subject(email.subject.clone())
        .message_id(email.message_id.clone());
    for a in &email.to {
        builder = builder.to(mailbox("To", a)?);
    }
    for a in &email.cc {
        builder = builder.cc(mailbox("Cc", a)?);
    }
    for a in &email.bcc {
        builder = builder.bcc(mailbox("Bcc", a)?);
    }
    if let Some(id) = &email.in_reply_to {
        builder = builder.in_reply_to(id.clone());
    }
    if let Some(refs) = &email.references {
        builder = builder.references(refs.clone());
    }
    if let Some(importance) = email.importance {
        builder = builder.header(ImportanceHeader(match importance {
            Importance::High => "high",
            Importance::Low => "low",
            Importance::Normal => "normal",
        }));
    }
    let text = SinglePart::builder()
        .header(if email.is_html {
            ContentType::TEXT_HTML
        } else {
            ContentType::TEXT_PLAIN
        })
        .body(email.body.clone());
    let decode = |a: &crate::creatio::contract::send::OutgoingAttachment| {
        base64::engine::general_purpose::STANDARD
            .decode(a.content_base64.trim())
            .map_err(|_| format!("the attachment {:?} is not base64", a.name))
    };
    let mut related = MultiPart::related().singlepart(text);
    let mut files = Vec::new();
    for a in &email.attachments {
        let bytes = decode(a)?;
        match (&a.content_id, a.is_inline) {
            (Some(cid), true) => {
                related = related.singlepart(
                    Attachment::new_inline_with_name(cid.clone(), a.name.clone())
                        .body(bytes, content_type(&a.name)),
                );
            }
            _ => files.push(Attachment::new(a.name.clone()).body(bytes, content_type(&a.name))),
        }
    }
    let mut mixed = MultiPart::mixed().multipart(related);
    for file in files {
        mixed = mixed.singlepart(file);
    }
    let message = builder.multipart(mixed).map_err(|e| e.to_string())?;
    let envelope = message.envelope();
    Ok(Submission {
        from: envelope
            .from()
            .map(ToString::to_string)
            .unwrap_or_else(|| sender.to_owned()),
        recipients: envelope.to().iter().map(ToString::to_string).collect(),
        message: message.formatted(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creatio::contract::send::OutgoingAttachment;

    #[test]
    fn a_mail_with_an_inline_image_and_a_file_reads_back_as_sent() {
        let email = OutgoingEmail {
            subject: "Quarterly report".into(),
            body: "<p>See <img src=\"cid:chart1\"></p>".into(),
            is_html: true,
            importance: Some(Importance::High),
            to: vec![Address {
                name: Some("Bob".into()),
                email: "bob@fabrikam.test".into(),
            }],
            cc: vec![],
            bcc: vec![Address {
                name: None,
                email: "audit@contoso.test".into(),
            }],
            message_id: Some("<report-1@contoso.test>".into()),
            in_reply_to: Some("<ask@fabrikam.test>".into()),
            references: Some("<ask@fabrikam.test>".into()),
            attachments: vec![
                OutgoingAttachment {
                    name: "chart.png".into(),
                    content_id: Some("chart1".into()),
                    is_inline: true,
                    content_base64: "iVBORw0KGgo=".into(),
                },
                OutgoingAttachment {
                    name: "report.pdf".into(),
                    content_id: None,
                    is_inline: false,
                    content_base64: "JVBERi0xLjQ=".into(),
                },
            ],
        };
        let s = submission("alice@contoso.test", &email).unwrap();
        assert_eq!(s.from, "alice@contoso.test");
        assert_eq!(s.recipients, ["bob@fabrikam.test", "audit@contoso.test"]);
        let text = String::from_utf8(s.message.clone()).unwrap();
        assert!(
            !text.contains("audit@contoso.test"),
            "Bcc stays off the headers"
        );
        let back = crate::creatio::mail::email_from_mime("x", &s.message);
        assert_eq!(back.subject, "Quarterly report");
        assert_eq!(back.message_id, "<report-1@contoso.test>");
        assert_eq!(back.in_reply_to, "<ask@fabrikam.test>");
        assert!(back.body.contains("cid:chart1"));
        let names: Vec<(&str, bool)> = back
            .attachments
            .iter()
            .map(|a| (a.name.as_str(), a.is_inline))
            .collect();
        assert!(names.contains(&("chart.png", true)), "{names:?}");
        assert!(names.contains(&("report.pdf", false)), "{names:?}");
        assert!(text.contains("Importance: high"), "{text}");
    }

    #[test]
    fn an_address_that_is_not_one_is_named() {
        let email = OutgoingEmail {
            subject: String::new(),
            body: String::new(),
            is_html: false,
            importance: None,
            to: vec![Address {
                name: None,
                email: "not an address".into(),
            }],
            cc: vec![],
            bcc: vec![],
            message_id: None,
            in_reply_to: None,
            references: None,
            attachments: vec![],
        };
        let err = submission("alice@contoso.test", &email).unwrap_err();
        assert!(err.starts_with("To "), "{err}");
    }
}
