//! A small namespace-resolved element tree over quick-xml.
//!
//! Envelopes are small (a notification batch, one item), so a tree keeps the typed decoders in
//! `response` simple and order-insensitive. Names are resolved to `(namespace URI, local name)`
//! while parsing; prefixes are forgotten.

use std::borrow::Cow;

use quick_xml::XmlVersion;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

use crate::error::EwsError;
use crate::ns::{ERRORS, MESSAGES, SOAP, TYPES};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    /// EWS's own namespaces are not copied into every element.
    pub ns: Option<Cow<'static, str>>,
    pub local: String,
    /// Unqualified attributes (every attribute EWS uses is unqualified); namespace
    /// declarations are not kept.
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn is(&self, ns: &str, local: &str) -> bool {
        self.ns.as_deref() == Some(ns) && self.local == local
    }

    pub fn child(&self, ns: &str, local: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.is(ns, local))
    }

    pub fn children_named<'a>(
        &'a self,
        ns: &'a str,
        local: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.is(ns, local))
    }

    /// The first child with this local name, in any namespace. Used only where deployed
    /// clients and servers disagree on the namespace of an element.
    pub fn child_by_local(&self, local: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.local == local)
    }

    pub fn child_text(&self, ns: &str, local: &str) -> Option<&str> {
        self.child(ns, local).map(|c| c.text.as_str())
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Follows a path of `(ns, local)` steps, taking the first match at each step.
    #[cfg(test)]
    pub fn path(&self, steps: &[(&str, &str)]) -> Option<&Element> {
        steps
            .iter()
            .try_fold(self, |el, (ns, local)| el.child(ns, local))
    }
}

/// Parses one XML document into its root element.
pub(crate) fn parse(bytes: &[u8]) -> Result<Element, EwsError> {
    let mut reader = NsReader::from_reader(bytes);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Element> = Vec::new();
    loop {
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(e) => {
                return Err(malformed(format!(
                    "{e} at byte {}",
                    reader.buffer_position()
                )));
            }
        };
        match event {
            Event::Start(start) => {
                let el = open(&reader, &start)?;
                stack.push(el);
            }
            Event::Empty(start) => {
                let el = open(&reader, &start)?;
                if let Some(root) = attach(&mut stack, el) {
                    return finish(reader, root);
                }
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| malformed("unbalanced end tag".into()))?;
                if let Some(root) = attach(&mut stack, el) {
                    return finish(reader, root);
                }
            }
            Event::Text(text) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&text.xml10_content());
                }
            }
            Event::CData(data) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&data.xml10_content());
                }
            }
            Event::GeneralRef(reference) => {
                let top = stack
                    .last_mut()
                    .ok_or_else(|| malformed("entity reference outside the root".into()))?;
                if let Some(ch) = reference
                    .resolve_char_ref()
                    .map_err(|e| malformed(e.to_string()))?
                {
                    top.text.push(ch);
                } else if let Some(s) = resolve_predefined_entity(&reference) {
                    top.text.push_str(s);
                } else {
                    return Err(malformed(format!("unknown entity &{};", &*reference)));
                }
            }
            Event::DocType(_) => return Err(malformed("DOCTYPE is not allowed".into())),
            Event::Eof => return Err(malformed("document ended before its root closed".into())),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
}

fn finish(mut reader: NsReader<&[u8]>, root: Element) -> Result<Element, EwsError> {
    // Only whitespace, comments and processing instructions may follow the root.
    loop {
        match reader.read_event().map_err(|e| malformed(e.to_string()))? {
            Event::Eof => return Ok(root),
            Event::Text(t) if t.xml10_content().trim().is_empty() => {}
            Event::Comment(_) | Event::PI(_) => {}
            _ => return Err(malformed("content after the root element".into())),
        }
    }
}

fn attach(stack: &mut [Element], el: Element) -> Option<Element> {
    match stack.last_mut() {
        Some(parent) => {
            parent.children.push(el);
            None
        }
        None => Some(el),
    }
}

fn open(reader: &NsReader<&[u8]>, start: &BytesStart<'_>) -> Result<Element, EwsError> {
    let (resolved, local) = reader.resolver().resolve_element(start.name());
    let ns = match resolved {
        ResolveResult::Bound(ns) => Some(namespace(ns.0)),
        ResolveResult::Unbound => None,
        ResolveResult::Unknown(prefix) => {
            return Err(malformed(format!("undeclared namespace prefix {prefix:?}")));
        }
    };
    let local = local.as_ref().to_owned();
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| malformed(e.to_string()))?;
        let key = attr.key;
        if key.as_ref() == "xmlns" || key.as_ref().starts_with("xmlns:") {
            continue;
        }
        let (_, local_key) = reader.resolver().resolve_attribute(key);
        let value = attr
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| malformed(e.to_string()))?
            .into_owned();
        attrs.push((local_key.as_ref().to_owned(), value));
    }
    Ok(Element {
        ns,
        local,
        attrs,
        children: Vec::new(),
        text: String::new(),
    })
}

/// A namespace URI: one of EWS's shared, any other copied.
fn namespace(uri: &str) -> Cow<'static, str> {
    match [SOAP, TYPES, MESSAGES, ERRORS]
        .into_iter()
        .find(|known| *known == uri)
    {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(uri.to_owned()),
    }
}

fn malformed(detail: String) -> EwsError {
    EwsError::Malformed(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_namespaces_by_uri_whatever_the_prefix() {
        let doc = br#"<?xml version="1.0"?>
            <Envelope xmlns="urn:a"><x:B xmlns:x="urn:b" Id="1&amp;2">t&lt;&#65;<![CDATA[<c>]]></x:B></Envelope>"#;
        let root = parse(doc).unwrap();
        assert!(root.is("urn:a", "Envelope"));
        let b = root.child("urn:b", "B").unwrap();
        assert_eq!(b.attr("Id"), Some("1&2"));
        assert_eq!(b.text, "t<A<c>");
    }

    #[test]
    fn rejects_truncated_and_undeclared() {
        assert!(parse(b"<a><b></b>").is_err());
        assert!(parse(b"<x:a/>").is_err());
        assert!(parse(b"<a/><b/>").is_err());
    }
}
