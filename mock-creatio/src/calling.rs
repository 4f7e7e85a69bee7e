//! Creatio's calling side: request bodies written as Creatio writes them, for everything that
//! plays Creatio towards the listener (tests, the harness, the benchmark). Creatio's Json.NET
//! writer runs with `QuoteName = false`: property names and dictionary keys unquoted,
//! strings quoted, nulls written, enums as integers. A `SynchronizationCredentials` carries
//! every property Creatio 8.1 sends.

use serde_json::{Value, json};

/// `ServerTypeId` of an Exchange mail server.
pub const EXCHANGE_SERVER_TYPE: &str = "3490BD45-4F4D-4613-AA06-454546F3342A";
/// `ServerTypeId` of an IMAP mail server.
pub const IMAP_SERVER_TYPE: &str = "844F0837-EAA0-4F40-B965-71F5DB9EAE6E";

/// `value` as Creatio writes it: names unquoted, everything else as JSON.
pub fn unquoted(value: &Value) -> String {
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut String) {
    match value {
        Value::Object(members) => {
            out.push('{');
            for (i, (name, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(name);
                out.push(':');
                write(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A mailbox's `SynchronizationCredentials` as Creatio sends it to Create, Recreate, Update
/// and Validate: an Exchange mailbox logging in as itself with `password` (or, with `None`,
/// through the listener's service account), every other property at Creatio's default.
pub fn credentials(
    id: &str,
    email: &str,
    password: Option<&str>,
    service_url: &str,
    bpm_endpoint: &str,
) -> Value {
    json!({
        "Id": id,
        "UserName": email,
        "Password": password,
        "AccessToken": null,
        "SenderEmailAddress": email,
        "ServiceUrl": service_url,
        "Port": 0,
        "UseSsl": service_url.to_ascii_lowercase().starts_with("https"),
        "SecureOption": 2,
        "IsAutodiscover": false,
        "AutodiscoverRedirectUrl": null,
        "UseOAuth": false,
        "ServerTypeId": EXCHANGE_SERVER_TYPE,
        "SubscriptionTtl": 0,
        "BpmEndpoint": bpm_endpoint,
        "BpmUser": "Supervisor",
        "BpmUserWorkspace": "Default",
        "BpmUserTimeZone": "UTC",
        "Context": "{UserRequested:false,HasError:false}",
        "FolderClassName": null,
        "FolderIds": [],
        "PersonalMetrics": false,
        "UseFullEmail": true,
        "FeatureValues": {
            "MarkEmailsAsSynchronized": false,
            "UseBinaryData": false,
            "UseImpersonation": false,
        },
    })
}

/// The `ServiceUrl` Creatio writes for a Microsoft 365 mailbox.
pub const EXCHANGE_ONLINE_URL: &str = "https://outlook.office365.com/EWS/Exchange.asmx";

/// A Microsoft 365 mailbox's `SynchronizationCredentials` as Creatio sends it: an Exchange
/// mailbox on Exchange Online, signing in with the OAuth token Creatio holds for EWS
/// (`UseOAuth`), no password.
pub fn microsoft365_credentials(
    id: &str,
    email: &str,
    access_token: &str,
    bpm_endpoint: &str,
) -> Value {
    let mut creds = credentials(id, email, None, EXCHANGE_ONLINE_URL, bpm_endpoint);
    creds["AccessToken"] = json!(access_token);
    creds["UseOAuth"] = json!(true);
    creds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_names_unquoted_and_values_as_json() {
        let v = json!([{"Id": "m\"1", "Port": 0, "AccessToken": null, "FolderIds": ["a"],
            "FeatureValues": {"UseImpersonation": false}}]);
        assert_eq!(
            unquoted(&v),
            r#"[{AccessToken:null,FeatureValues:{UseImpersonation:false},FolderIds:["a"],Id:"m\"1",Port:0}]"#
        );
        assert_eq!(unquoted(&json!(["a", "b"])), r#"["a","b"]"#);
    }
}
