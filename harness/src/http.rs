//! The JSON calls the harness makes to the parts it drives.

use anyhow::{Context as _, bail};
use serde_json::Value;

/// GETs `url` and answers its JSON; a failure status is an error.
pub async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    Ok(http
        .get(url)
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .json()
        .await?)
}

/// POSTs `body` to `url`; answers the JSON answer, or null when there is none. A failure
/// status is an error carrying the answer's text.
pub async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let resp = http.post(url).json(body).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("POST {url}: {status} {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// POSTs `body` to the listener as Creatio writes it (names unquoted); answers as
/// [`post_json`].
pub async fn post_creatio(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let resp = http
        .post(url)
        .header("Content-Type", "application/json; charset=utf-8")
        .body(mock_creatio::calling::unquoted(body))
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("POST {url}: {status} {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// PUTs `body` to `url`; a failure status is an error carrying the answer's text.
pub async fn put_json(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<()> {
    let resp = http.put(url).json(body).send().await?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("PUT {url} {body}: {status} {text}");
    }
    Ok(())
}

/// How many ProcessFullEmail calls mock-creatio at `base` recorded (without their bodies).
pub async fn full_emails_delivered(http: &reqwest::Client, base: &str) -> anyhow::Result<u64> {
    let stats = get_json(http, &format!("{base}/_control/stats")).await?;
    Ok(stats["calls"]["ProcessFullEmail"].as_u64().unwrap_or(0))
}
