//! Where the store's commands go: one Redis, or the master that Redis Sentinel names, followed
//! as Sentinel promotes another.
//!
//! `redis+sentinel://[:password@]host:port[,host:port…]/<master name>[/<db>]` names the
//! sentinels and the master's name; the password and database are the master's. Every second
//! the sentinels are asked which server is the master (the answer is checked with that
//! server's own `ROLE`); when it changes, new connections go to the new one, and the next
//! heartbeat moves the spread's version so that every replica checks its leases again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};

use crate::engine::store::StoreError;

/// The scheme that names sentinels rather than a Redis.
pub const SENTINEL_SCHEME: &str = "redis+sentinel://";

/// How often the sentinels are asked for the master.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The sentinels and the master they watch, as a `redis+sentinel://` URL names them.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    pub db: i64,
    pub password: Option<String>,
}

impl std::fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelTarget")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl SentinelTarget {
    /// Reads `redis+sentinel://[:password@]host:port[,host:port…]/<master>[/<db>]`.
    pub fn parse(url: &str) -> Result<SentinelTarget, String> {
        let rest = url
            .strip_prefix(SENTINEL_SCHEME)
            .ok_or_else(|| format!("not a {SENTINEL_SCHEME} URL"))?;
        let (password, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => {
                let password = auth.strip_prefix(':').unwrap_or(auth);
                let password = percent_encoding::percent_decode_str(password)
                    .decode_utf8()
                    .map_err(|_| "the password is not UTF-8 once %-decoded".to_owned())?
                    .into_owned();
                (Some(password).filter(|p| !p.is_empty()), rest)
            }
            None => (None, rest),
        };
        let mut parts = rest.splitn(3, '/');
        let hosts = parts.next().unwrap_or_default();
        let master = parts.next().unwrap_or_default();
        let db = match parts.next().map(|d| d.trim_end_matches('/')) {
            None | Some("") => 0,
            Some(d) => d
                .parse::<i64>()
                .map_err(|_| format!("{d:?} is not a database number"))?,
        };
        if master.is_empty() {
            return Err("the master's name is missing (…/<master name>[/<db>])".into());
        }
        let sentinels = hosts
            .split(',')
            .map(|h| {
                let (host, port) = h
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{h:?} is not host:port"))?;
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("{h:?} is not host:port"))?;
                let host = host.trim_matches(['[', ']']);
                if host.is_empty() {
                    return Err(format!("{h:?} is not host:port"));
                }
                Ok((host.to_owned(), port))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(SentinelTarget {
            sentinels,
            master: master.to_owned(),
            db,
            password,
        })
    }

    fn client(&self) -> redis::RedisResult<SentinelClient> {
        let nodes: Vec<String> = self
            .sentinels
            .iter()
            .map(|(host, port)| format!("redis://{}:{port}", bracketed(host)))
            .collect();
        let mut redis = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(password) = &self.password {
            redis = redis.set_password(password);
        }
        SentinelClient::build(
            nodes,
            &self.master,
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(redis)),
            SentinelServerType::Master,
        )
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The connection the store's commands take, and the client its change channel listens
/// through: one Redis for good, or Sentinel's master of the moment.
#[derive(Clone)]
pub struct Link {
    current: Arc<RwLock<Option<(redis::Client, ConnectionManager)>>>,
    config: ConnectionManagerConfig,
    /// The commands moved to another master since [`Link::take_moved`] last asked.
    moved: Arc<AtomicBool>,
}

impl Link {
    /// Commands to this one Redis, connected on first use.
    pub fn fixed(
        client: redis::Client,
        config: ConnectionManagerConfig,
    ) -> Result<Link, StoreError> {
        let link = Link {
            current: Arc::default(),
            config,
            moved: Arc::default(),
        };
        link.point_at(client)?;
        Ok(link)
    }

    /// Commands to the master the sentinels name, followed for as long as the process lives;
    /// until the sentinels first answer, commands fail as Redis being unavailable.
    pub fn following(
        target: SentinelTarget,
        config: ConnectionManagerConfig,
    ) -> Result<Link, StoreError> {
        let mut sentinel = target
            .client()
            .map_err(|e| StoreError::Unavailable(format!("the Sentinel settings: {e}")))?;
        let link = Link {
            current: Arc::default(),
            config,
            moved: Arc::default(),
        };
        let following = link.clone();
        tokio::spawn(async move {
            let mut said_unreachable = false;
            loop {
                match sentinel.async_get_client().await {
                    Ok(client) => {
                        said_unreachable = false;
                        let address = client.get_connection_info().addr().to_string();
                        if following.address().as_deref() != Some(address.as_str()) {
                            tracing::info!(master = %address, name = %target.master, "Redis master, as Sentinel names it");
                            if let Err(e) = following.point_at(client) {
                                tracing::warn!(error = %e, "cannot use the Redis master Sentinel names");
                            }
                        }
                    }
                    Err(e) if !said_unreachable => {
                        said_unreachable = true;
                        tracing::warn!(error = %e, name = %target.master, "Sentinel names no reachable master; asking again every second");
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(FOLLOW_EVERY).await;
            }
        });
        Ok(link)
    }

    fn point_at(&self, client: redis::Client) -> Result<(), StoreError> {
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let before = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace((client, conn));
        if before.is_some() {
            self.moved.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// True once after the commands moved to another master (a Sentinel failover): writes
    /// the old master took just before may be missing from the new one.
    pub fn take_moved(&self) -> bool {
        self.moved.swap(false, Ordering::SeqCst)
    }

    /// Says again that the commands moved, when the one who took the news could not act on it.
    pub fn note_moved(&self) {
        self.moved.store(true, Ordering::SeqCst);
    }

    fn address(&self) -> Option<String> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(client, _)| client.get_connection_info().addr().to_string())
    }

    /// The connection for the next commands.
    pub fn conn(&self) -> Result<ConnectionManager, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, conn)| conn.clone())
            .ok_or_else(|| {
                StoreError::Unavailable("no Redis master is known yet (Sentinel)".into())
            })
    }

    /// The client for a new connection of its own (the change channel).
    pub fn client(&self) -> Option<redis::Client> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(client, _)| client.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_the_sentinels_the_master_and_its_database() {
        let t = SentinelTarget::parse(
            "redis+sentinel://:p%40ss@sentinel-0:26379,sentinel-1:26379,[::1]:26380/mymaster/3",
        )
        .unwrap();
        assert_eq!(
            t.sentinels,
            [
                ("sentinel-0".to_owned(), 26379),
                ("sentinel-1".to_owned(), 26379),
                ("::1".to_owned(), 26380)
            ]
        );
        assert_eq!((t.master.as_str(), t.db), ("mymaster", 3));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert!(
            !format!("{t:?}").contains("p@ss"),
            "no password in debug output"
        );
        // As the listener writes it from ExchangeListenerRedisPassword.
        let escaped = SentinelTarget::parse("redis+sentinel://:p%40ss%20word@s:26379/m").unwrap();
        assert_eq!(escaped.password.as_deref(), Some("p@ss word"));
        let plain = SentinelTarget::parse("redis+sentinel://s:26379/m").unwrap();
        assert_eq!((plain.db, plain.password), (0, None));
        for bad in [
            "redis+sentinel://s:26379",
            "redis+sentinel://s:26379/",
            "redis+sentinel://s/m",
            "redis+sentinel://s:26379/m/x",
            "redis://s:26379/m",
        ] {
            assert!(SentinelTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
