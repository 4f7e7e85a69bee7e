//! Cutting a `GetStreamingEvents` body into complete SOAP envelopes as bytes arrive.
//!
//! The body is a concatenation of envelopes whose boundaries have nothing to do with HTTP
//! chunks or socket reads. [`EnvelopeSplitter`] scans markup incrementally (tags, comments,
//! CDATA, processing instructions, quoted attribute values) and tracks element depth; when a
//! top-level element closes, its bytes are one envelope. It never searches for a literal
//! `</soap:Envelope>`: the prefix differs between servers. Which element it is, is for
//! [`crate::response::parse_stream_envelope`] to check, by namespace.

use crate::error::EwsError;

/// The largest envelope accepted before the stream is declared broken (a notification batch
/// is a few KiB; this guards memory against a server that never closes its root element).
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024 * 1024;

/// Incremental splitter of a byte stream into top-level XML elements.
#[derive(Debug, Default)]
pub struct EnvelopeSplitter {
    buf: Vec<u8>,
    /// Where the next unscanned token starts in `buf`.
    pos: usize,
    depth: usize,
    /// Start of the current top-level element in `buf`, while inside one.
    start: Option<usize>,
}

enum Token {
    Open,
    Close,
    SelfClosed,
    Other,
}

impl EnvelopeSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the body; returns every envelope they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, EwsError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((token, end)) = self.next_token()? {
            let at = self.pos;
            self.pos = end;
            match token {
                Token::Open => {
                    if self.depth == 0 {
                        self.start = Some(at);
                    }
                    self.depth += 1;
                }
                Token::SelfClosed if self.depth == 0 => out.push(self.buf[at..end].to_vec()),
                Token::Close => {
                    if self.depth == 0 {
                        return Err(EwsError::Malformed("end tag without a start tag".into()));
                    }
                    self.depth -= 1;
                    if self.depth == 0 {
                        let start = self.start.take().unwrap_or(at);
                        out.push(self.buf[start..end].to_vec());
                    }
                }
                Token::SelfClosed | Token::Other => {}
            }
        }
        self.compact()?;
        Ok(out)
    }

    /// True when no envelope has started and not been completed: a body may end here cleanly.
    pub fn is_idle(&self) -> bool {
        self.depth == 0 && self.buf[self.pos..].iter().all(u8::is_ascii_whitespace)
    }

    /// Drops bytes no longer needed, keeping the open envelope (if any) and the unscanned tail.
    fn compact(&mut self) -> Result<(), EwsError> {
        let keep_from = self.start.unwrap_or(self.pos);
        if keep_from > 0 {
            self.buf.drain(..keep_from);
            self.pos -= keep_from;
            if let Some(s) = self.start.as_mut() {
                *s = 0;
            }
        }
        if self.buf.is_empty() {
            // Between envelopes a stream may wait for hours: hold no room for the next one.
            self.buf = Vec::new();
        }
        if self.buf.len() > MAX_ENVELOPE_BYTES {
            return Err(EwsError::Malformed(format!(
                "streaming envelope larger than {MAX_ENVELOPE_BYTES} bytes"
            )));
        }
        Ok(())
    }

    /// The token at `pos` and the offset just past it, or `None` when it is incomplete.
    fn next_token(&self) -> Result<Option<(Token, usize)>, EwsError> {
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            return Ok(None);
        }
        if rest[0] != b'<' {
            // Character data: runs to the next '<', or is consumed whole (its content is
            // re-read from the envelope bytes later, so nothing is lost).
            let len = memchr(b'<', rest).unwrap_or(rest.len());
            if self.depth == 0 && !rest[..len].iter().all(u8::is_ascii_whitespace) {
                return Err(EwsError::Malformed("text outside any envelope".into()));
            }
            return Ok(Some((Token::Other, self.pos + len)));
        }
        let found = |needle: &[u8], from: usize| {
            find(&rest[from..], needle).map(|i| (Token::Other, self.pos + from + i + needle.len()))
        };
        if rest.starts_with(b"<!--") {
            return Ok(found(b"-->", 4));
        }
        if rest.starts_with(b"<![CDATA[") {
            return Ok(found(b"]]>", 9));
        }
        if rest.starts_with(b"<?") {
            return Ok(found(b"?>", 2));
        }
        // A prefix of one of the markers above cannot be classified yet.
        if [&b"<!--"[..], b"<![CDATA[", b"<?"]
            .iter()
            .any(|m| rest.len() < m.len() && m.starts_with(rest))
        {
            return Ok(None);
        }
        if rest.starts_with(b"<!") {
            return Err(EwsError::Malformed(
                "DOCTYPE or other declaration in stream".into(),
            ));
        }
        // A start or end tag: find the closing '>' outside quoted attribute values.
        let mut quote = None;
        for (i, &b) in rest.iter().enumerate().skip(1) {
            match (quote, b) {
                (Some(q), _) if b == q => quote = None,
                (Some(_), _) => {}
                (None, b'"' | b'\'') => quote = Some(b),
                (None, b'>') => {
                    let token = if rest[1] == b'/' {
                        Token::Close
                    } else if rest[i - 1] == b'/' {
                        Token::SelfClosed
                    } else {
                        Token::Open
                    };
                    return Ok(Some((token, self.pos + i + 1)));
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BODY: &[u8] = br#"<?xml version="1.0" encoding="utf-8"?>
<Envelope xmlns="urn:s"><a x="1>2" y='</Envelope>'/><!-- </Envelope> --><![CDATA[</Envelope>]]></Envelope>
<s:Envelope xmlns:s="urn:s"><s:Body>text &amp; more</s:Body></s:Envelope><e:Envelope xmlns:e="urn:s"/>"#;

    fn expected() -> Vec<Vec<u8>> {
        vec![
            br#"<Envelope xmlns="urn:s"><a x="1>2" y='</Envelope>'/><!-- </Envelope> --><![CDATA[</Envelope>]]></Envelope>"#.to_vec(),
            br#"<s:Envelope xmlns:s="urn:s"><s:Body>text &amp; more</s:Body></s:Envelope>"#.to_vec(),
            br#"<e:Envelope xmlns:e="urn:s"/>"#.to_vec(),
        ]
    }

    #[test]
    fn splits_a_whole_body_at_once() {
        let mut s = EnvelopeSplitter::new();
        assert_eq!(s.push(BODY).unwrap(), expected());
        assert!(s.is_idle());
    }

    /// A stream waits between envelopes, often for hours: it holds nothing of the last one.
    #[test]
    fn holds_no_buffer_between_envelopes() {
        let mut s = EnvelopeSplitter::new();
        assert_eq!(s.push(BODY).unwrap(), expected());
        assert_eq!(s.buf.capacity(), 0);
        assert!(s.push(b"<a><b>").unwrap().is_empty());
        assert!(s.buf.capacity() > 0, "an open envelope is kept");
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut s = EnvelopeSplitter::new();
        let got: Vec<_> = BODY.iter().flat_map(|b| s.push(&[*b]).unwrap()).collect();
        assert_eq!(got, expected());
    }

    #[test]
    fn reports_an_open_envelope_as_not_idle() {
        let mut s = EnvelopeSplitter::new();
        assert!(s.push(b"<a><b>").unwrap().is_empty());
        assert!(!s.is_idle());
    }

    #[test]
    fn rejects_text_between_envelopes() {
        assert!(EnvelopeSplitter::new().push(b"<a/>junk<b/>").is_err());
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_envelopes(cuts in proptest::collection::vec(0..BODY.len(), 0..20)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut s = EnvelopeSplitter::new();
            let mut got = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([BODY.len()]) {
                got.extend(s.push(&BODY[from..cut]).unwrap());
                from = cut;
            }
            prop_assert_eq!(got, expected());
            prop_assert!(s.is_idle());
        }
    }
}
