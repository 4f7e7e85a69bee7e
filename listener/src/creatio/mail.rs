//! Turning a fetched mail into the email Creatio receives. The mail's MIME text is the
//! source (one converter for every protocol): sender and recipients as `Name <address>`,
//! the HTML body where there is one, every header field as `Name=Value`, attachments in
//! base64 with their Content-ID, the thread's `In-Reply-To` and `References`. A mail whose
//! server gave no MIME text is built from the server's own properties.

use base64::Engine as _;
use ews::Message;
use mail_parser::{MessageParser, MimeHeaders};

use crate::creatio::contract::{Attachment, Email, Importance, ticks_from_unix_ms};

/// The email for Creatio from an EWS item: its MIME content when Exchange gave it, with
/// Exchange's own properties where the MIME text is silent.
pub fn to_email(item_id: &str, msg: Message) -> Email {
    let parsed = msg
        .mime_content
        .as_deref()
        .and_then(|mime| MessageParser::default().parse(mime));
    let mut email = match &parsed {
        Some(mime) => from_mime(item_id, mime),
        None => from_properties(item_id, &msg),
    };
    // Exchange's Message-ID, dates and importance stand when the MIME text lacks them.
    if let Some(id) = msg.internet_message_id.filter(|id| !id.trim().is_empty()) {
        email.message_id = id;
    }
    if email.send_date_time_stamp == 0
        && let Some(ms) = msg
            .date_time_sent
            .or(msg.date_time_received)
            .as_deref()
            .and_then(parse_xs_datetime)
    {
        email.send_date_time_stamp = ticks_from_unix_ms(ms);
    }
    if parsed.as_ref().is_none_or(|m| importance_of(m).is_none())
        && let Some(i) = msg.importance.as_deref().and_then(Importance::from_text)
    {
        email.importance = i;
    }
    fill_gaps(&mut email);
    email
}

/// The email for Creatio from a mail's RFC 5322 text alone (no id of a server's item
/// beyond `item_id`, and no fallback): what an IMAP mailbox will hand over.
pub fn email_from_mime(item_id: &str, mime: &[u8]) -> Email {
    let mut email = match MessageParser::default().parse(mime) {
        Some(parsed) => from_mime(item_id, &parsed),
        None => Email {
            id: item_id.to_owned(),
            ..Email::default()
        },
    };
    fill_gaps(&mut email);
    email
}

/// What Creatio cannot do without: a Message-ID (its de-duplication key; one stable per item
/// when the mail has none) and a send date (now, when nothing says when).
fn fill_gaps(email: &mut Email) {
    if email.message_id.is_empty() {
        email.message_id = format!("<{}@exchange-listener.invalid>", email.id);
    }
    if email.send_date_time_stamp == 0 {
        email.send_date_time_stamp = crate::creatio::contract::ticks_now();
    }
}

fn from_mime(item_id: &str, m: &mail_parser::Message<'_>) -> Email {
    let addresses = |a: Option<&mail_parser::Address<'_>>| -> Vec<String> {
        a.map(|a| {
            a.iter()
                .filter_map(|addr| Some(display_address(addr.name(), addr.address()?)))
                .collect()
        })
        .unwrap_or_default()
    };
    // Asked only of a mail with an HTML part: of any other, mail_parser writes its text out
    // as HTML, to be thrown away.
    let html = if has_html_part(m) {
        m.body_html(0)
    } else {
        None
    };
    let (body, is_html_body) = match html {
        Some(html) => (html.into_owned(), true),
        None => (
            m.body_text(0).map(|t| t.into_owned()).unwrap_or_default(),
            false,
        ),
    };
    let attachments = m
        .attachments()
        .enumerate()
        .map(|(i, part)| attachment(i, part, &body))
        .collect();
    Email {
        id: item_id.to_owned(),
        subject: m.subject().unwrap_or_default().to_owned(),
        sender: addresses(m.from().or(m.sender()))
            .into_iter()
            .next()
            .unwrap_or_default(),
        recipients: addresses(m.to()),
        copy_recipients: addresses(m.cc()),
        blind_copy_recipients: addresses(m.bcc()),
        body,
        headers: m
            .headers_raw()
            .map(|(name, value)| format!("{name}={}", unfold(value)))
            .collect(),
        importance: importance_of(m).unwrap_or_default(),
        is_html_body,
        attachments,
        send_date_time_stamp: m.date().filter(|d| d.is_valid()).map_or(0, |d| {
            ticks_from_unix_ms(d.to_timestamp().saturating_mul(1000))
        }),
        message_id: m.header_raw("Message-ID").map(unfold).unwrap_or_default(),
        in_reply_to: m.header_raw("In-Reply-To").map(unfold).unwrap_or_default(),
        references: m.header_raw("References").map(unfold).unwrap_or_default(),
    }
}

/// Whether the mail has a real HTML part (not plain text that the parser would render as
/// HTML).
fn has_html_part(m: &mail_parser::Message<'_>) -> bool {
    m.html_bodies().any(|p| p.is_text_html())
}

fn importance_of(m: &mail_parser::Message<'_>) -> Option<Importance> {
    ["Importance", "X-Priority", "Priority"]
        .iter()
        .find_map(|h| m.header_raw(*h).and_then(Importance::from_text))
}

fn attachment(index: usize, part: &mail_parser::MessagePart<'_>, body: &str) -> Attachment {
    let id = part
        .content_id()
        .map(|cid| {
            cid.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
        .unwrap_or_default();
    let disposition_inline = part
        .content_disposition()
        .is_some_and(|d| d.ctype().eq_ignore_ascii_case("inline"));
    let is_inline = !id.is_empty() && (disposition_inline || body.contains(&format!("cid:{id}")));
    let name = part
        .attachment_name()
        .map(str::to_owned)
        .unwrap_or_else(|| match part.message() {
            Some(inner) => format!(
                "{}.eml",
                inner
                    .subject()
                    .filter(|s| !s.is_empty())
                    .unwrap_or("message")
            ),
            None => format!("attachment-{}", index + 1),
        });
    Attachment {
        id,
        name,
        base64_data: base64::engine::general_purpose::STANDARD.encode(part.contents()),
        is_inline,
    }
}

/// A header field's value with its folding undone and its edges trimmed.
fn unfold(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for (i, line) in raw.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if i > 0 && !line.is_empty() {
            out.push(' ');
        }
        out.push_str(line.trim_start_matches([' ', '\t']));
    }
    out.trim().to_owned()
}

/// `Name <address>`, the name quoted when it holds a character that would split it.
fn display_address(name: Option<&str>, address: &str) -> String {
    match name
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != address)
    {
        None => address.to_owned(),
        Some(name)
            if name.contains(['"', '\\', ',', ';', ':', '<', '>', '@', '(', ')', '[', ']']) =>
        {
            let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
            format!("\"{escaped}\" <{address}>")
        }
        Some(name) => format!("{name} <{address}>"),
    }
}

/// The email from Exchange's properties, for an item without MIME content.
fn from_properties(item_id: &str, msg: &Message) -> Email {
    let address = |m: &ews::Mailbox| {
        m.email
            .as_deref()
            .map(|a| display_address(m.name.as_deref(), a))
    };
    Email {
        id: item_id.to_owned(),
        subject: msg.subject.clone().unwrap_or_default(),
        body: msg.body.clone().unwrap_or_default(),
        is_html_body: msg.body_is_html,
        sender: msg
            .from
            .as_ref()
            .or(msg.sender.as_ref())
            .and_then(address)
            .unwrap_or_default(),
        recipients: msg.to.iter().filter_map(address).collect(),
        copy_recipients: msg.cc.iter().filter_map(address).collect(),
        ..Email::default()
    }
}

/// Milliseconds since the Unix epoch, now: the unit of every timestamp sent to Creatio.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch of an `xs:dateTime` such as `2024-05-01T10:00:00Z`,
/// `2024-05-01T10:00:00.123+02:00` or (taken as UTC) `2024-05-01T10:00:00`.
pub fn parse_xs_datetime(s: &str) -> Option<i64> {
    let s = s.trim();
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if s.get(4..5)? != "-"
        || s.get(7..8)? != "-"
        || !matches!(s.get(10..11)?, "T" | "t")
        || s.get(13..14)? != ":"
        || s.get(16..17)? != ":"
    {
        return None;
    }
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", frac.get(..digits.min(3))?);
        millis = padded.parse::<i64>().ok()?;
        rest = frac.get(digits..)?;
    }
    let offset_minutes = match rest {
        "" | "Z" | "z" => 0,
        tz if tz.len() == 6
            && (tz.starts_with('+') || tz.starts_with('-'))
            && tz.get(3..4)? == ":" =>
        {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (tz.get(1..3)?.parse::<i64>().ok()? * 60 + tz.get(4..6)?.parse::<i64>().ok()?)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(
        ((days * 86_400 + hour * 3600 + minute * 60 + second) - offset_minutes * 60) * 1000
            + millis,
    )
}

/// The `xs:dateTime` in UTC, to the second (what EWS compares received times at), of a time
/// in milliseconds since the Unix epoch; the millisecond part is dropped.
pub fn xs_datetime(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Proleptic Gregorian date of a day count (the inverse of `days_from_civil`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_it_reads() {
        for unix_ms in [0, 951_782_400_000, 1_714_557_600_000, 4_102_444_799_000] {
            assert_eq!(parse_xs_datetime(&xs_datetime(unix_ms)), Some(unix_ms));
        }
        assert_eq!(xs_datetime(1_714_557_600_999), "2024-05-01T10:00:00Z");
        assert_eq!(xs_datetime(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn parses_the_forms_exchange_sends() {
        assert_eq!(parse_xs_datetime("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_xs_datetime("2024-05-01T10:00:00Z"),
            Some(1_714_557_600_000)
        );
        assert_eq!(
            parse_xs_datetime("2024-05-01T12:00:00.5+02:00"),
            Some(1_714_557_600_500)
        );
        assert_eq!(
            parse_xs_datetime("2000-02-29T00:00:00"),
            Some(951_782_400_000)
        );
        for bad in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00Z",
            "2024-05-01T10:00:00Q",
            "2024-05-01T10:00:00.",
        ] {
            assert_eq!(parse_xs_datetime(bad), None, "{bad}");
        }
    }

    #[test]
    fn never_panics_on_what_a_server_sends() {
        // Multi-byte characters where the parser expects ASCII once panicked it.
        for odd in [
            "2024-05-01T10:00:00+0é00",
            "2024-05-01T10:00:00é",
            "2024-05-01T10:00:00.é",
            "2024-05-01T10:0é:00Z",
            "é024-05-01T10:00:00Z",
        ] {
            assert_eq!(parse_xs_datetime(odd), None, "{odd}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_is_refused(s in "\\PC{0,40}", tail in "[0-9:+.Zé-]{0,8}") {
            let _ = parse_xs_datetime(&s);
            let _ = parse_xs_datetime(&format!("2024-05-01T10:00:00{tail}"));
        }

        #[test]
        fn any_message_maps_to_an_email(subject in proptest::option::of("\\PC{0,20}"), id in proptest::option::of("\\PC{0,20}"), sent in proptest::option::of("\\PC{0,30}")) {
            let msg = Message { subject, internet_message_id: id, date_time_sent: sent.clone(), date_time_received: sent, ..Message::default() };
            let email = to_email("AAMk", msg);
            proptest::prop_assert!(!email.message_id.trim().is_empty());
        }

        #[test]
        fn any_bytes_map_to_an_email(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let email = email_from_mime("AAMk", &bytes);
            proptest::prop_assert!(!email.message_id.trim().is_empty());
        }
    }

    const RICH: &str = concat!(
        "Received: from mx.example.com by mail.contoso.com\r\n",
        "From: \"Doe, Jane\" <jane@example.com>\r\n",
        "To: Alice <alice@contoso.com>, bob@contoso.com\r\n",
        "Cc: =?utf-8?B?0JrQsNGC0Y8=?= <katya@example.com>\r\n",
        "Subject: =?utf-8?B?R3LDvMOfZQ==?=\r\n",
        "Date: Wed, 01 May 2024 12:00:00 +0200\r\n",
        "Message-ID: <m1@example.com>\r\n",
        "In-Reply-To: <m0@example.com>\r\n",
        "References: <a@example.com>\r\n <m0@example.com>\r\n",
        "Importance: high\r\n",
        "MIME-Version: 1.0\r\n",
        "Content-Type: multipart/mixed; boundary=\"mixed\"\r\n",
        "\r\n",
        "--mixed\r\n",
        "Content-Type: multipart/related; boundary=\"rel\"\r\n",
        "\r\n",
        "--rel\r\n",
        "Content-Type: multipart/alternative; boundary=\"alt\"\r\n",
        "\r\n",
        "--alt\r\n",
        "Content-Type: text/plain; charset=utf-8\r\n",
        "\r\n",
        "plain\r\n",
        "--alt\r\n",
        "Content-Type: text/html; charset=utf-8\r\n",
        "\r\n",
        "<p>hi <img src=\"cid:logo@x\"></p>\r\n",
        "--alt--\r\n",
        "--rel\r\n",
        "Content-Type: image/png; name=\"logo.png\"\r\n",
        "Content-Disposition: inline; filename=\"logo.png\"\r\n",
        "Content-ID: <logo@x>\r\n",
        "Content-Transfer-Encoding: base64\r\n",
        "\r\n",
        "iVBORw0K\r\n",
        "--rel--\r\n",
        "--mixed\r\n",
        "Content-Type: application/pdf; name=\"=?utf-8?B?w7xiZXIucGRm?=\"\r\n",
        "Content-Disposition: attachment; filename=\"=?utf-8?B?w7xiZXIucGRm?=\"\r\n",
        "Content-Transfer-Encoding: base64\r\n",
        "\r\n",
        "JVBERi0=\r\n",
        "--mixed--\r\n",
    );

    #[test]
    fn a_mime_mail_becomes_creatios_email() {
        let e = email_from_mime("AAMk1", RICH.as_bytes());
        assert_eq!(e.id, "AAMk1");
        assert_eq!(e.subject, "Grüße");
        assert_eq!(e.sender, "\"Doe, Jane\" <jane@example.com>");
        assert_eq!(
            e.recipients,
            ["Alice <alice@contoso.com>", "bob@contoso.com"]
        );
        assert_eq!(e.copy_recipients, ["Катя <katya@example.com>"]);
        assert!(e.blind_copy_recipients.is_empty());
        assert!(e.is_html_body);
        assert_eq!(e.body.trim(), "<p>hi <img src=\"cid:logo@x\"></p>");
        assert_eq!(e.message_id, "<m1@example.com>");
        assert_eq!(e.in_reply_to, "<m0@example.com>");
        assert_eq!(e.references, "<a@example.com> <m0@example.com>");
        assert_eq!(e.importance, Importance::High);
        // 2024-05-01T10:00:00Z in .NET ticks.
        assert_eq!(e.send_date_time_stamp, 638_501_544_000_000_000);
        assert!(
            e.headers
                .contains(&"References=<a@example.com> <m0@example.com>".to_owned())
        );
        assert!(
            e.headers
                .iter()
                .any(|h| h.starts_with("Received=from mx.example.com"))
        );
        assert_eq!(e.headers.len(), 12);
        assert_eq!(
            e.attachments,
            [
                Attachment {
                    id: "logo@x".into(),
                    name: "logo.png".into(),
                    base64_data: "iVBORw0K".into(),
                    is_inline: true,
                },
                Attachment {
                    id: String::new(),
                    name: "über.pdf".into(),
                    base64_data: "JVBERi0=".into(),
                    is_inline: false,
                },
            ]
        );
    }

    #[test]
    fn a_plain_mail_keeps_its_text_and_exchange_fills_the_gaps() {
        let mime = "From: bob@example.com\r\nSubject: hi\r\n\r\nline1\r\nline2\r\n";
        let msg = Message {
            mime_content: Some(mime.as_bytes().to_vec()),
            internet_message_id: Some("<x@example.com>".into()),
            date_time_sent: Some("2024-05-01T10:00:00Z".into()),
            importance: Some("Low".into()),
            ..Message::default()
        };
        let e = to_email("AAMk2", msg);
        assert!(!e.is_html_body);
        assert_eq!(e.body, "line1\r\nline2\r\n");
        assert_eq!(e.sender, "bob@example.com");
        assert_eq!(e.message_id, "<x@example.com>");
        assert_eq!(e.send_date_time_stamp, 638_501_544_000_000_000);
        assert_eq!(e.importance, Importance::Low);
        assert_eq!(e.headers, ["From=bob@example.com", "Subject=hi"]);
        assert!(e.attachments.is_empty() && e.recipients.is_empty());
    }

    #[test]
    fn without_mime_the_servers_properties_serve() {
        let msg = Message {
            subject: Some("s".into()),
            body: Some("<b>x</b>".into()),
            body_is_html: true,
            from: Some(ews::Mailbox {
                name: Some("Bob".into()),
                email: Some("bob@example.com".into()),
            }),
            ..Message::default()
        };
        let e = to_email("AAMk3", msg);
        assert_eq!(e.sender, "Bob <bob@example.com>");
        assert!(e.is_html_body);
        assert_eq!(e.body, "<b>x</b>");
        assert_eq!(e.importance, Importance::Normal);
        assert!(e.send_date_time_stamp > 0);
    }

    #[test]
    fn missing_message_id_is_replaced_stably() {
        let a = to_email("AAMk1", Message::default());
        let b = to_email("AAMk1", Message::default());
        assert_eq!(a.message_id, "<AAMk1@exchange-listener.invalid>");
        assert_eq!(a.message_id, b.message_id);
    }
}
