//! JSON as Creatio writes it. Creatio serialises the bodies of `/api/listeners/*` and
//! `/api/mailbox/*` with Json.NET's `QuoteName = false`: property names and dictionary keys
//! come unquoted (`[{Id:"8f0e…",UseSsl:true,AccessToken:null}]`), everything else is ordinary
//! JSON. This reader quotes such names and hands the text to `serde_json`, so nothing else is
//! relaxed: single quotes, comments, trailing commas and bare values stay errors.

use serde_json::Value;

/// Parses a request body written by Creatio (unquoted names) or by anyone else (strict JSON).
/// A UTF-8 byte-order mark in front is skipped. The error says where, in the body as sent.
pub fn parse(body: &[u8]) -> Result<Value, String> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    let quoted = quote_names(text);
    serde_json::from_str(&quoted.text).map_err(|e| {
        let message = e.to_string();
        // serde_json appends " at line L column C" (in the quoted text); say where in the body.
        let what = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(what, _)| what);
        match quoted.original_offset(e.line(), e.column()) {
            Some(at) => format!("{what} at byte {}", at + 1),
            None => what.to_owned(),
        }
    })
}

/// The text with every bare name quoted, and where quotes were added.
struct Quoted {
    text: String,
    /// Byte offsets in `text` of each quoted name's opening quote, with the bytes added
    /// before and by it (two quotes, and any escapes).
    added: Vec<(usize, usize)>,
}

impl Quoted {
    /// The byte offset in the original body of serde_json's (1-based line, column) in
    /// `text`, counting the column in bytes.
    fn original_offset(&self, line: usize, column: usize) -> Option<usize> {
        if line == 0 {
            return None;
        }
        let line_start = if line == 1 {
            0
        } else {
            self.text
                .match_indices('\n')
                .nth(line - 2)
                .map(|(i, _)| i + 1)?
        };
        let at = line_start + column.saturating_sub(1);
        let shift = self
            .added
            .iter()
            .take_while(|(pos, _)| *pos < at)
            .last()
            .map_or(0, |(_, total)| *total);
        Some(at.saturating_sub(shift))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

/// Bytes that end a bare name (Json.NET writes the name as it is, up to the colon).
fn ends_name(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b':' | b',' | b'{' | b'}' | b'[' | b']' | b'"')
}

fn quote_names(text: &str) -> Quoted {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 64);
    let mut added = Vec::new();
    let mut total_added = 0;
    let mut stack: Vec<Container> = Vec::new();
    // After `{`, or after `,` inside an object: the next token is a name.
    let mut name_expected = false;
    let mut i = 0;
    // Copied verbatim up to `copied`; only bare names are rewritten.
    let mut copied = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' {
            // Skip a string, escapes included.
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            name_expected = false;
            continue;
        }
        if b.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if name_expected && b != b'}' && !ends_name(b) {
            let start = i;
            while i < bytes.len() && !ends_name(bytes[i]) {
                i += 1;
            }
            out.push_str(&text[copied..start]);
            let name = serde_json::Value::String(text[start..i].to_owned()).to_string();
            total_added += name.len() - (i - start);
            added.push((out.len(), total_added));
            out.push_str(&name);
            copied = i;
            name_expected = false;
            continue;
        }
        match b {
            b'{' => {
                stack.push(Container::Object);
                name_expected = true;
            }
            b'[' => {
                stack.push(Container::Array);
                name_expected = false;
            }
            b'}' | b']' => {
                stack.pop();
                name_expected = false;
            }
            b',' => name_expected = stack.last() == Some(&Container::Object),
            _ => name_expected = false,
        }
        i += 1;
    }
    out.push_str(&text[copied.min(text.len())..]);
    Quoted { text: out, added }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_names_as_creatio_writes_them() {
        let body = br#"[{Id:"8f0e",SenderEmailAddress:"a@b.c",UseSsl:true,Port:0,AccessToken:null,FolderIds:[],FeatureValues:{UseImpersonation:false},Context:"{UserRequested:true}"}]"#;
        assert_eq!(
            parse(body).unwrap(),
            json!([{"Id": "8f0e", "SenderEmailAddress": "a@b.c", "UseSsl": true, "Port": 0,
                "AccessToken": null, "FolderIds": [], "FeatureValues": {"UseImpersonation": false},
                "Context": "{UserRequested:true}"}])
        );
    }

    #[test]
    fn strict_json_and_mixed_forms_read_alike() {
        let strict = br#"{"Id":"x","Nested":{"A":[1,{"B":null}]},"List":["a,b:c","{d}"]}"#;
        let bare = br#"{ Id : "x", Nested:{A:[1,{B:null}]}, "List":["a,b:c","{d}"] }"#;
        assert_eq!(parse(strict).unwrap(), parse(bare).unwrap());
        assert_eq!(parse(b"\xEF\xBB\xBF[\"a\"]").unwrap(), json!(["a"]));
        assert_eq!(
            parse(br#"{8f0e-11:true, "k\"x":1}"#).unwrap(),
            json!({"8f0e-11": true, "k\"x": 1})
        );
        assert_eq!(
            parse(br#"[true,false,null]"#).unwrap(),
            json!([true, false, null])
        );
    }

    #[test]
    fn nothing_else_is_relaxed() {
        for bad in [
            &b"{Id:'x'}"[..],
            b"{Id:\"x\",}",
            b"{Id:x}",
            b"[1,]",
            b"{Id:\"x\" // comment\n}",
            b"{:1}",
            b"",
            b"\xff",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn errors_point_into_the_body_as_sent() {
        // The bad value `x` is byte 16 (1-based, as serde_json counts) of the body.
        let err = parse(br#"{Id:"a",Other:x}"#).unwrap_err();
        assert_eq!(err, "expected value at byte 15");
        let err = parse(b"{\n Id:\"a\",\n Other:x}").unwrap_err();
        assert!(err.starts_with("expected value at byte"), "{err}");
    }

    fn value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "\\PC{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[A-Za-z_][A-Za-z0-9_-]{0,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Writes `v` as Json.NET does with `QuoteName = false`.
    fn unquoted(v: &Value) -> String {
        match v {
            Value::Object(m) => format!(
                "{{{}}}",
                m.iter()
                    .map(|(k, v)| format!("{k}:{}", unquoted(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Value::Array(a) => {
                format!("[{}]", a.iter().map(unquoted).collect::<Vec<_>>().join(","))
            }
            other => other.to_string(),
        }
    }

    proptest::proptest! {
        #[test]
        fn any_value_reads_back_from_either_form(v in value()) {
            proptest::prop_assert_eq!(parse(unquoted(&v).as_bytes()).unwrap(), v.clone());
            proptest::prop_assert_eq!(parse(v.to_string().as_bytes()).unwrap(), v);
        }

        #[test]
        fn any_text_is_read_or_refused(s in "\\PC{0,60}") {
            let _ = parse(s.as_bytes());
        }
    }
}
