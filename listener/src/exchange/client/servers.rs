//! What the listener keeps per Exchange server, shared by every mailbox's client: the request
//! version and login learned, the service account, and the connections that account's NTLM
//! calls share.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use ews::ServerVersion;

use crate::config::EwsAuth;
use crate::exchange::service_account::{ServiceAccount, ServiceAccounts};

/// Makes an HTTP client with connections of its own, for a mailbox that logs in with NTLM.
pub type ClientFactory = Arc<dyn Fn() -> reqwest::Client + Send + Sync>;

/// What the listener learned of each Exchange server, shared by every mailbox's client so a
/// server is asked once. The request version: the configured one until a server refuses it
/// (`ErrorInvalidServerVersion`, as Exchange 2010 and 2013 do for versions newer than theirs);
/// then the one that server names in `ServerVersionInfo`, or the next older, never below
/// Exchange2010_SP1. The login: NTLM where configured, or where a server's 401 offers NTLM (or
/// Negotiate) and not Basic. The service account, where one is configured for the server,
/// that serves its mailboxes created without a password.
#[derive(Clone)]
pub struct Servers {
    preferred: ServerVersion,
    learned: Arc<Mutex<HashMap<String, ServerVersion>>>,
    auth: EwsAuth,
    ntlm: Arc<Mutex<HashSet<String>>>,
    /// Makes an NTLM mailbox's client for its calls.
    pub(super) private_client: ClientFactory,
    accounts: Arc<ServiceAccounts>,
    /// Makes the clients of a service account's lanes.
    pub(super) lane_client: ClientFactory,
    /// Streams on connections of their own, when set.
    pub(super) streams: Option<super::StreamConnections>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("preferred", &self.preferred)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Servers {
    pub fn new(preferred: ServerVersion, auth: EwsAuth, private_client: ClientFactory) -> Self {
        Servers {
            preferred,
            learned: Arc::default(),
            auth,
            ntlm: Arc::default(),
            lane_client: private_client.clone(),
            private_client,
            accounts: Arc::default(),
            streams: None,
        }
    }

    /// Opens the streams of mailboxes that log in with a password or a token on connections
    /// of their own ([`super::StreamConnections`]) instead of through the HTTP client.
    pub fn with_stream_connections(mut self, streams: super::StreamConnections) -> Self {
        self.streams = Some(streams);
        self
    }

    /// Serves mailboxes created without a password through these accounts, whose NTLM
    /// lanes are clients `lane_client` makes.
    pub fn with_accounts(mut self, accounts: ServiceAccounts, lane_client: ClientFactory) -> Self {
        self.accounts = Arc::new(accounts);
        self.lane_client = lane_client;
        self
    }

    /// The service account serving the server of `url`, if one is configured.
    pub fn account_for(&self, url: &str) -> Option<Arc<ServiceAccount>> {
        self.accounts.for_url(url)
    }

    /// Whether mailboxes with a password log in to the server of `url` with NTLM.
    pub(super) fn wants_ntlm(&self, url: &str) -> bool {
        match self.auth {
            EwsAuth::Ntlm => true,
            EwsAuth::Basic => false,
            EwsAuth::Auto => self
                .ntlm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&Self::server(url)),
        }
    }

    /// A 401 from the server of `url` offered these schemes to a Basic login: true (and
    /// remembered) when the server takes NTLM and not Basic.
    pub(super) fn learn_ntlm(&self, url: &str, offered: &[String]) -> bool {
        let ntlm = offered.iter().any(|s| s == "ntlm" || s == "negotiate");
        let basic = offered.iter().any(|s| s == "basic");
        if self.auth != EwsAuth::Auto || !ntlm || basic {
            return false;
        }
        self.ntlm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Self::server(url));
        true
    }

    /// The server an EWS URL names: its scheme and authority.
    pub(crate) fn server(url: &str) -> String {
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[scheme_end..];
        let end = scheme_end + rest.find(['/', '?', '#']).unwrap_or(rest.len());
        url[..end].to_ascii_lowercase()
    }

    /// The version to speak to the server of `url`.
    pub fn for_server(&self, url: &str) -> ServerVersion {
        self.learned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&Self::server(url))
            .copied()
            .unwrap_or(self.preferred)
    }

    /// The server of `url` refused `tried`: answers the older version to try next, and
    /// remembers it; `None` when there is none (the server is older than streaming).
    pub fn refused(
        &self,
        url: &str,
        tried: ServerVersion,
        said: Option<ews::ServerVersionInfo>,
    ) -> Option<ServerVersion> {
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        let server = Self::server(url);
        let known = learned.get(&server).copied().unwrap_or(self.preferred);
        // Another mailbox learned an older one meanwhile: take it.
        let next = if known < tried {
            known
        } else {
            match said {
                Some(info) => info.request_version().filter(|v| *v < tried)?,
                None => tried.older()?,
            }
        };
        learned.insert(server, next);
        Some(next)
    }
}

/// Connections a service account's NTLM calls share: its mailboxes all log in as one user,
/// so they may share authenticated connections, where one per mailbox would hold thousands
/// open. NTLM authenticates a connection in three legs that must stay on it; a lane is one
/// connection, used by one call at a time, so no other call slips between the legs.
pub struct Lanes {
    lanes: Vec<Lane>,
    next: std::sync::atomic::AtomicUsize,
}

struct Lane {
    http: reqwest::Client,
    busy: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lanes({})", self.lanes.len())
    }
}

/// A lane held for one call.
pub(super) struct LaneGuard<'a> {
    _busy: tokio::sync::MutexGuard<'a, ()>,
    pub(super) http: &'a reqwest::Client,
}

impl Lanes {
    pub(super) fn new(count: usize, make: &ClientFactory) -> Self {
        Lanes {
            lanes: (0..count)
                .map(|_| Lane {
                    http: make(),
                    busy: tokio::sync::Mutex::new(()),
                })
                .collect(),
            next: Default::default(),
        }
    }

    /// A free lane, else the next in turn once it is free.
    pub(super) async fn acquire(&self) -> LaneGuard<'_> {
        for lane in &self.lanes {
            if let Ok(busy) = lane.busy.try_lock() {
                return LaneGuard {
                    _busy: busy,
                    http: &lane.http,
                };
            }
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.lanes.len();
        let lane = &self.lanes[i];
        LaneGuard {
            _busy: lane.busy.lock().await,
            http: &lane.http,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_version_steps_down_per_server_and_never_below_streaming() {
        let shared = reqwest::Client::new();
        let factory: ClientFactory = Arc::new(move || shared.clone());
        let versions = Servers::new(
            ServerVersion::Exchange2013Sp1,
            EwsAuth::Auto,
            factory.clone(),
        );
        let a = "https://MAIL.contoso.local/EWS/Exchange.asmx";
        let b = "https://other.contoso.local/EWS/Exchange.asmx";
        let said = |major, minor, version: &str| {
            Some(ews::ServerVersionInfo {
                major,
                minor,
                build: 0,
                version: Some(version.into()),
            })
        };
        // The server names its version: taken, for that server only.
        assert_eq!(
            versions.refused(
                a,
                ServerVersion::Exchange2013Sp1,
                said(14, 2, "Exchange2010_SP2")
            ),
            Some(ServerVersion::Exchange2010Sp2)
        );
        assert_eq!(
            versions.for_server("https://mail.contoso.local/ews/exchange.asmx"),
            ServerVersion::Exchange2010Sp2
        );
        assert_eq!(versions.for_server(b), ServerVersion::Exchange2013Sp1);
        // A mailbox that tried the old version after another learned: the learned one.
        assert_eq!(
            versions.refused(a, ServerVersion::Exchange2013Sp1, None),
            Some(ServerVersion::Exchange2010Sp2)
        );
        // Nothing said: one step down; at the floor, nothing left to try.
        assert_eq!(
            versions.refused(b, ServerVersion::Exchange2013Sp1, None),
            Some(ServerVersion::Exchange2013)
        );
        assert_eq!(
            versions.refused(
                a,
                ServerVersion::Exchange2010Sp2,
                said(14, 0, "Exchange2010")
            ),
            None
        );
        let floor = Servers::new(ServerVersion::Exchange2010Sp1, EwsAuth::Auto, factory);
        assert_eq!(floor.refused(a, ServerVersion::Exchange2010Sp1, None), None);
        // A server naming a version no older than the one refused is not believed.
        assert_eq!(
            floor.refused(
                b,
                ServerVersion::Exchange2010Sp1,
                said(15, 1, "V2017_07_11")
            ),
            None
        );
    }
}
