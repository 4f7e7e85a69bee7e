//! Wall-clock timestamps in the two formats mail needs: `xs:dateTime` for EWS and RFC 5322
//! for MIME headers. Only formatting lives here; no timer does.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn split(unix: i64) -> (i64, u32, u32, i64, i64, i64) {
    let (y, mo, d) = civil_from_days(unix.div_euclid(86_400));
    let secs = unix.rem_euclid(86_400);
    (y, mo, d, secs / 3600, secs % 3600 / 60, secs % 60)
}

/// `2024-05-01T10:00:00Z`
pub fn xs_datetime(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = split(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Seconds since the Unix epoch of an `xs:dateTime` in UTC (`2024-05-01T10:00:00Z`, fractions
/// of a second dropped).
pub fn parse_xs_datetime(s: &str) -> Option<i64> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, mo, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.split('.').next()?;
    let mut t = time.splitn(3, ':').map(str::parse::<i64>);
    let (h, mi, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (the inverse of `civil_from_days`).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
}

/// `Wed, 01 May 2024 10:00:00 +0000`
pub fn rfc5322(unix: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s) = split(unix);
    let weekday = DAYS[unix.div_euclid(86_400).rem_euclid(7) as usize];
    format!(
        "{weekday}, {d:02} {} {y:04} {h:02}:{mi:02}:{s:02} +0000",
        MONTHS[mo as usize - 1]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(xs_datetime(0), "1970-01-01T00:00:00Z");
        assert_eq!(xs_datetime(1_714_557_600), "2024-05-01T10:00:00Z");
        assert_eq!(rfc5322(1_714_557_600), "Wed, 01 May 2024 10:00:00 +0000");
        assert_eq!(xs_datetime(951_782_400), "2000-02-29T00:00:00Z");
        for unix in [0, 951_782_400, 1_714_557_600, 4_102_444_799] {
            assert_eq!(parse_xs_datetime(&xs_datetime(unix)), Some(unix));
        }
        assert_eq!(
            parse_xs_datetime("2024-05-01T10:00:00.123Z"),
            Some(1_714_557_600)
        );
        assert_eq!(parse_xs_datetime("2024-13-01T10:00:00Z"), None);
    }
}
