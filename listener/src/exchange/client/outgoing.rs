//! A mail Creatio asked to send, as EWS's `CreateItem` takes it.

use crate::creatio::contract::send::{self, OutgoingEmail};

/// A mail Creatio asked to send, as `CreateItem` takes it.
pub(super) fn outgoing_message(email: &OutgoingEmail) -> ews::OutgoingMessage {
    let recipients = |list: &[send::Address]| {
        list.iter()
            .map(|a| ews::Recipient {
                name: a.name.clone(),
                email: a.email.clone(),
            })
            .collect()
    };
    ews::OutgoingMessage {
        subject: email.subject.clone(),
        body: email.body.clone(),
        body_is_html: email.is_html,
        importance: email.importance.map(|i| match i {
            send::Importance::Low => "Low",
            send::Importance::Normal => "Normal",
            send::Importance::High => "High",
        }),
        to: recipients(&email.to),
        cc: recipients(&email.cc),
        bcc: recipients(&email.bcc),
        internet_message_id: email.message_id.clone(),
        in_reply_to: email.in_reply_to.clone(),
        references: email.references.clone(),
        attachments: email
            .attachments
            .iter()
            .map(|a| ews::OutgoingAttachment {
                name: a.name.clone(),
                content_type: content_type(&a.name).map(str::to_owned),
                content_id: a.content_id.clone(),
                is_inline: a.is_inline,
                content_base64: a.content_base64.clone(),
            })
            .collect(),
    }
}

/// The media type of a file by its name's extension, for the common kinds; the server
/// decides for the rest.
fn content_type(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "htm" | "html" => "text/html",
        "csv" => "text/csv",
        "zip" => "application/zip",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        _ => return None,
    })
}
