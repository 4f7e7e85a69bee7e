//! Where the listener may connect. Creatio's calls name the addresses (`ServiceUrl`,
//! `BpmEndpoint`), and the API is open: it must not become a way to reach a cloud's metadata
//! service, or any host an administrator did not mean.
//!
//! Link-local addresses (IPv4 169.254.0.0/16 and IPv6 fe80::/10, where cloud metadata services
//! answer; and AWS's fd00:ec2::254) are refused unless allowed, whether a call writes one as an
//! IP (checked when the call arrives) or a host name resolves to one (filtered by the
//! [`GuardedResolver`] of every connection). Optional allow-lists name the Exchange and Creatio
//! hosts a locked-down install talks to.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Host;

use crate::creatio::contract::{ContractError, Credentials};

/// AWS's IPv6 instance metadata address.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// True for the addresses refused unless `--allow-link-local`.
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == AWS_METADATA_V6
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
    }
}

/// Host names an install allows: exact names or IPs, and `*.example.com` for any name under
/// `example.com`. Empty allows every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostList(Vec<String>);

impl HostList {
    /// Parses the patterns of a flag; each is a host, not a URL.
    pub fn parse(patterns: &[String]) -> Result<HostList, String> {
        let mut list = Vec::new();
        for p in patterns.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            let name = p.strip_prefix("*.").unwrap_or(p);
            if name.is_empty()
                || name.contains(['*', '/', ':', '@', ' '])
                || name.starts_with('.')
                || name.ends_with('.')
            {
                return Err(format!(
                    "{p:?} is not a host name (e.g. mail.contoso.com or *.contoso.com)"
                ));
            }
            list.push(p.to_ascii_lowercase());
        }
        Ok(HostList(list))
    }

    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.0.is_empty()
            || self.0.iter().any(|p| match p.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                None => *p == host,
            })
    }
}

/// The install's rules for the addresses Creatio's calls name.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    pub allow_link_local: bool,
    pub exchange_hosts: HostList,
    pub creatio_hosts: HostList,
}

impl Reach {
    /// Refuses credentials whose Exchange or Creatio address the install does not allow;
    /// the error names the field.
    /// `address` is the URL the mailbox's protocol reads `ServiceUrl` as (none when it cannot
    /// read it: the worker reports that configuration error itself).
    pub fn check(&self, creds: &Credentials, address: Option<&str>) -> Result<(), ContractError> {
        if let Some(url) = address {
            self.check_url("ServiceUrl", url, &self.exchange_hosts, "--exchange-hosts")?;
        }
        // Validate may come without a callback.
        if creds.bpm_endpoint.is_empty() {
            return Ok(());
        }
        self.check_creatio("BpmEndpoint", &creds.bpm_endpoint)
    }

    /// Refuses a Creatio address the install does not allow; the error names `field`.
    pub fn check_creatio(&self, field: &'static str, url: &str) -> Result<(), ContractError> {
        self.check_url(field, url, &self.creatio_hosts, "--creatio-hosts")
    }

    fn check_url(
        &self,
        field: &'static str,
        url: &str,
        allowed: &HostList,
        flag: &str,
    ) -> Result<(), ContractError> {
        let invalid = |reason: String| ContractError::Invalid { field, reason };
        let url = Url::parse(url).map_err(|e| invalid(format!("is not a valid URL: {e}")))?;
        // The URL parser reads every IPv4 spelling (2852039166, 0xa9.254.169.254, ...) as the
        // address it means.
        let (host, ip) = match url.host() {
            Some(Host::Ipv4(v4)) => (v4.to_string(), Some(IpAddr::V4(v4))),
            Some(Host::Ipv6(v6)) => (v6.to_string(), Some(IpAddr::V6(v6))),
            Some(Host::Domain(d)) => (d.to_owned(), None),
            None => return Err(invalid("must name a host".into())),
        };
        if ip.is_some_and(is_link_local) && !self.allow_link_local {
            return Err(invalid(format!(
                "host {host} is a link-local address, where cloud metadata services answer; \
                 the listener refuses it unless run with --allow-link-local"
            )));
        }
        if !allowed.allows(&host) {
            return Err(invalid(format!(
                "host {host} is not among the hosts this listener may reach ({flag})"
            )));
        }
        Ok(())
    }
}

/// The system resolver, without link-local answers (unless allowed): a host name cannot lead
/// where an IP written in a call may not.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_link_local: bool,
}

/// The addresses a connection may use, or why none.
pub fn usable(
    host: &str,
    addrs: impl IntoIterator<Item = SocketAddr>,
    allow_link_local: bool,
) -> Result<Vec<SocketAddr>, String> {
    let all: Vec<SocketAddr> = addrs.into_iter().collect();
    let kept: Vec<SocketAddr> = all
        .iter()
        .copied()
        .filter(|a| allow_link_local || !is_link_local(a.ip()))
        .collect();
    match (all.is_empty(), kept.is_empty()) {
        (true, _) => Err(format!("{host} has no address")),
        (false, true) => Err(format!(
            "{host} resolves only to link-local addresses, which are refused"
        )),
        (false, false) => Ok(kept),
    }
}

impl GuardedResolver {
    /// The addresses of `host` at `port` a connection may use.
    pub async fn lookup(
        self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
        let found = tokio::net::lookup_host((host, port)).await?;
        Ok(usable(host, found, self.allow_link_local)?)
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let this = *self;
        Box::pin(async move {
            let kept = this.lookup(&host, 0).await?;
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creatio::contract::parse_credentials_list;

    #[test]
    fn link_local_and_metadata_addresses() {
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_link_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "127.0.0.1",
            "192.168.1.1",
            "::1",
            "fd00::1",
            "fec0::1",
        ] {
            assert!(!is_link_local(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn host_lists() {
        let list = HostList::parse(&["Mail.Contoso.com".into(), "*.corp.example".into()]).unwrap();
        assert!(list.allows("mail.contoso.com"));
        assert!(list.allows("MAIL.CONTOSO.COM"));
        assert!(list.allows("ex1.corp.example"));
        assert!(list.allows("a.b.corp.example"));
        assert!(!list.allows("corp.example"), "the wildcard needs a label");
        assert!(!list.allows("evilcorp.example"));
        assert!(!list.allows("contoso.com"));
        assert!(HostList::default().allows("anything"));
        for bad in [
            "https://mail.contoso.com",
            "mail:443",
            "*",
            "*.",
            "a.*.b",
            "user@host",
        ] {
            assert!(HostList::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    fn creds(server: &str, bpm: &str) -> Credentials {
        let body = serde_json::json!([{
            "Id": "m", "SenderEmailAddress": "a@contoso.com", "Password": "pw",
            "ServiceUrl": server, "BpmEndpoint": bpm,
        }]);
        parse_credentials_list(body.to_string().as_bytes())
            .unwrap()
            .remove(0)
    }

    /// Checks credentials as the API does for an Exchange mailbox.
    fn check(reach: &Reach, creds: &Credentials) -> Result<(), ContractError> {
        let address = crate::exchange::client::ews_url(creds.service_url.as_deref(), creds.use_ssl);
        reach.check(creds, address.ok().as_deref())
    }

    const BPM: &str =
        "https://creatio.contoso.com/0/ServiceModel/ExchangeListenerService.svc/NewEmail";

    #[test]
    fn link_local_hosts_are_refused_in_every_spelling() {
        let reach = Reach::default();
        for server in [
            "http://169.254.169.254/",
            "169.254.169.254",
            "http://2852039166/",
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://[fe80::1]/",
            "http://[::ffff:169.254.169.254]/",
        ] {
            let err = check(&reach, &creds(server, BPM)).unwrap_err().to_string();
            assert!(
                err.starts_with("ServiceUrl") && err.contains("link-local"),
                "{server}: {err}"
            );
        }
        let err = check(
            &reach,
            &creds("mail.contoso.com", "http://169.254.169.254/x/NewEmail"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("BpmEndpoint"), "{err}");
        let allowing = Reach {
            allow_link_local: true,
            ..Reach::default()
        };
        assert!(check(&allowing, &creds("169.254.10.10", BPM)).is_ok());
        assert!(check(&reach, &creds("10.1.2.3", BPM)).is_ok());
    }

    #[test]
    fn allow_lists_name_the_field_and_the_flag() {
        let reach = Reach {
            exchange_hosts: HostList::parse(&["*.contoso.com".into()]).unwrap(),
            creatio_hosts: HostList::parse(&["creatio.contoso.com".into()]).unwrap(),
            ..Reach::default()
        };
        assert!(check(&reach, &creds("mail.contoso.com", BPM)).is_ok());
        let err = check(&reach, &creds("mail.fabrikam.com", BPM))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("ServiceUrl") && err.contains("--exchange-hosts"),
            "{err}"
        );
        let err = check(
            &reach,
            &creds(
                "mail.contoso.com",
                "https://other.contoso.com/0/ServiceModel/ExchangeListenerService.svc/NewEmail",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("BpmEndpoint") && err.contains("--creatio-hosts"),
            "{err}"
        );
    }

    #[test]
    fn resolved_link_local_addresses_are_dropped() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            usable("h", [a("169.254.169.254:0"), a("10.0.0.5:0")], false).unwrap(),
            [a("10.0.0.5:0")]
        );
        assert!(
            usable("h", [a("169.254.169.254:0")], false)
                .unwrap_err()
                .contains("link-local")
        );
        assert_eq!(
            usable("h", [a("169.254.169.254:0")], true).unwrap(),
            [a("169.254.169.254:0")]
        );
        assert!(usable("h", [], false).is_err());
    }

    #[tokio::test]
    async fn the_resolver_still_resolves() {
        let resolver = GuardedResolver {
            allow_link_local: false,
        };
        let addrs: Vec<SocketAddr> = resolver
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert!(!addrs.is_empty());
    }
}
