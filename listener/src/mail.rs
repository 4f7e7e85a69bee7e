//! Turning a fetched EWS message into the email Creatio receives.

use ews::Message;

use crate::contract::Email;

/// The email for Creatio. Creatio skips an email without a Message-ID, so one missing from
/// the server is replaced by a stable one derived from the item id.
pub fn to_email(item_id: &str, msg: Message) -> Email {
    let address = |m: &ews::Mailbox| m.email.clone().unwrap_or_default();
    let sender = msg.sender.as_ref().or(msg.from.as_ref());
    Email {
        item_id: item_id.to_owned(),
        message_id: msg
            .internet_message_id
            .filter(|id| !id.trim().is_empty())
            .unwrap_or_else(|| format!("<{item_id}@exchange-listener.invalid>")),
        subject: msg.subject.unwrap_or_default(),
        sender: sender.map(address).unwrap_or_default(),
        sender_name: sender.and_then(|m| m.name.clone()),
        to: msg.to.iter().map(address).collect(),
        cc: msg.cc.iter().map(address).collect(),
        body: msg.body.unwrap_or_default(),
        is_html: msg.body_is_html,
        importance: msg.importance,
        sent_unix_ms: msg.date_time_sent.as_deref().and_then(parse_xs_datetime),
        received_unix_ms: msg
            .date_time_received
            .as_deref()
            .and_then(parse_xs_datetime),
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
    }

    #[test]
    fn missing_message_id_is_replaced_stably() {
        let a = to_email("AAMk1", Message::default());
        let b = to_email("AAMk1", Message::default());
        assert_eq!(a.message_id, "<AAMk1@exchange-listener.invalid>");
        assert_eq!(a.message_id, b.message_id);
    }
}
