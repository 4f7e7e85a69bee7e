//! The hot path of one mail, step by step: a streaming body cut into envelopes, a
//! notification and a GetItem answer decoded, a mail's MIME turned into Creatio's `Email`, and
//! the callback body written. `cargo bench -p exchange-listener --bench hot_path`; CI compiles
//! it (`cargo bench --no-run`) so it never rots.

use std::hint::black_box;

use base64::Engine as _;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use exchange_listener::creatio::contract::{self, parse_credentials_list};
use exchange_listener::creatio::mail::email_from_mime;

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ews/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A mail as Exchange serves it: 4 KiB of text, an HTML alternative, a 16 KiB file.
fn mime() -> Vec<u8> {
    let mut mail = mock_ews::generated(7, 1);
    mail.body = "Dear customer, about the order. ".repeat(128);
    mail.attachments = vec![mock_ews::Attachment {
        name: "offer.pdf".into(),
        content_type: "application/pdf".into(),
        content_base64: base64::engine::general_purpose::STANDARD.encode(vec![b'%'; 16 * 1024]),
        content_id: None,
    }];
    mock_ews::render("AAMkAGI2bench", "alice@contoso.com", mail).mime
}

fn hot_path(c: &mut Criterion) {
    // A streaming connection's body: many notifications, arriving in 1 KiB chunks.
    let stream = fixture("stream_exchange2013.xml");
    let body: Vec<u8> = stream.repeat(64);
    let mut group = c.benchmark_group("stream");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("split 64 envelopes in 1 KiB chunks", |b| {
        b.iter(|| {
            let mut splitter = ews::EnvelopeSplitter::new();
            let mut envelopes = 0;
            for chunk in body.chunks(1024) {
                envelopes += splitter
                    .push(black_box(chunk))
                    .expect("a valid stream")
                    .len();
            }
            envelopes
        })
    });
    group.finish();

    let envelope = ews::EnvelopeSplitter::new()
        .push(&stream)
        .expect("a valid stream")
        .into_iter()
        .next()
        .expect("an envelope");
    c.bench_function("decode a notification envelope", |b| {
        b.iter(|| ews::response::parse_stream_envelope(black_box(&envelope)))
    });
    let get_item = fixture("get_item_mixed.xml");
    c.bench_function("decode a GetItem answer", |b| {
        b.iter(|| ews::response::parse_get_item(black_box(&get_item)))
    });

    let mime = mime();
    let mut group = c.benchmark_group("mail");
    group.throughput(Throughput::Bytes(mime.len() as u64));
    group.bench_function(
        "MIME to Creatio's Email (4 KiB text, HTML, 16 KiB file)",
        |b| b.iter(|| email_from_mime("AAMkAGI2bench", black_box(&mime))),
    );
    group.finish();

    let creds = parse_credentials_list(
        br#"[{"Id":"5b0f8fad-d9cb-469f-a165-70867728950e","SenderEmailAddress":"alice@contoso.com",
            "Password":"secret","ServiceUrl":"https://mail.contoso.com/EWS/Exchange.asmx",
            "BpmEndpoint":"https://crm.contoso.com/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail"}]"#,
    )
    .expect("valid credentials")
    .remove(0);
    let email = email_from_mime("AAMkAGI2bench", &mime);
    c.bench_function("write the ProcessFullEmail body", |b| {
        b.iter(|| {
            contract::full_email_payload(
                &creds,
                std::slice::from_ref(black_box(&email)),
                639_012_345_678_900_000,
            )
        })
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
