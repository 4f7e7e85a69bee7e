//! exchange-listener: Creatio's Exchange Listener service.
//!
//! Creatio calls the HTTP API ([`creatio::api`]) to start, stop and check mailbox
//! subscriptions. The protocol-neutral [`engine`] keeps mailboxes, leases and cursors in its
//! store and runs one worker per mailbox, which watches the mailbox's server through one seam
//! ([`engine::protocol`]), fetches each new mail and posts it to the mailbox's Creatio callback
//! ([`creatio::delivery`]). Each mail protocol lives in its own module ([`exchange`] for EWS,
//! [`imap`] for IMAP).

pub mod config;
pub mod creatio;
pub mod engine;
pub mod exchange;
pub mod graph;
pub mod imap;
pub mod server;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;

pub use config::Config;

/// A TLS configuration trusting the system's roots through the platform verifier, with
/// `extra_pem`'s CAs (read from the file `flag` names) besides, built once to be shared:
/// what reqwest would build for Exchange (with `alpn`), or the one for IMAP servers.
fn shared_tls(
    extra_pem: &[u8],
    flag: &str,
    alpn: Option<&[u8]>,
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let extra = CertificateDer::pem_slice_iter(extra_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag}: not a PEM bundle"))?;
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    Ok(config)
}

/// How long a connection to Exchange or Creatio may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the listener calls itself in every request.
const USER_AGENT: &str = concat!("exchange-listener/", env!("CARGO_PKG_VERSION"));

/// Idle connections kept per Exchange server for the calls of mailboxes that log in with Basic
/// or a bearer token.
const EWS_IDLE_CONNECTIONS_PER_HOST: usize = 64;

/// How long a service account's NTLM lane stays open once idle (the HTTP client's default).
const LANE_KEEP_ALIVE: Duration = Duration::from_secs(90);

/// The lease of a replica alone on its in-memory store.
const LONE_LEASE: Duration = Duration::from_secs(3600);

/// Serves the API on `listener` until `shutdown` completes and the drain time after it has
/// passed, while every mailbox stops (each unsubscribes) from the moment `shutdown` completes;
/// returns within the drain time and the configured shutdown timeout.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let reach = config.reach().map_err(|e| anyhow::anyhow!(e))?;
    let allow_link_local = reach.allow_link_local;
    let builder = move || {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // No host name may lead where an address written in a call may not.
            .dns_resolver(Arc::new(engine::reach::GuardedResolver {
                allow_link_local,
            }))
            // reqwest's default TCP_USER_TIMEOUT (30 s) drops a connection when a keep-alive probe
            // is outstanding and no data has arrived for 30 s: a stream between two 45 s server
            // heartbeats. The stream's idle watchdog and every request's timeout bound time instead.
            .tcp_user_timeout(None)
            // A redirect would re-post a SOAP body with its credentials, or a mail, to another
            // host: never follow one; the EWS client reports it as a configuration error.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
    };
    // Creatio's calls trust the system's roots; Exchange's may also trust an internal CA, or,
    // in a lab, anything.
    let http = builder().build().context("building the HTTP client")?;
    let ews_ca_pem = match &config.ews_ca_file {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("--ews-ca-file {}", path.display()))?
        }
        None => Vec::new(),
    };
    let ews_certs = match &config.ews_ca_file {
        Some(path) => reqwest::Certificate::from_pem_bundle(&ews_ca_pem)
            .with_context(|| format!("--ews-ca-file {}: not a PEM bundle", path.display()))?,
        None => Vec::new(),
    };
    if config.ews_tls_insecure {
        tracing::warn!(
            "--ews-tls-insecure: Exchange's certificates are not checked; anyone on the path can read the mailboxes' passwords"
        );
    }
    let insecure = config.ews_tls_insecure;
    let ews_builder = move || {
        builder()
            .tls_certs_merge(ews_certs.clone())
            .tls_danger_accept_invalid_certs(insecure)
    };
    // The calls of every mailbox that logs in with Basic or a token share these connections;
    // what a burst of calls (thousands of mailboxes subscribing at once) opened beyond them is
    // closed as it comes back, instead of idling for 90 s.
    let ews_http = ews_builder()
        .pool_max_idle_per_host(EWS_IDLE_CONNECTIONS_PER_HOST)
        .build()
        .context("building the EWS HTTP client")?;
    // NTLM authenticates connections: an NTLM mailbox gets call connections of its own (its
    // stream has one of its own too), all with one TLS configuration (the trusted roots loaded
    // once, not once per mailbox).
    let shared = ews_http.clone();
    let ews_tls = if insecure {
        None
    } else {
        Some(
            shared_tls(&ews_ca_pem, "--ews-ca-file", Some(b"http/1.1"))
                .context("the TLS configuration for Exchange")?,
        )
    };
    // A stream on a connection of its own holds a fraction of what one through the HTTP
    // client holds; a proxy named in the environment is the HTTP client's to use, so then
    // streams go through it.
    let proxied = ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some() || std::env::var_os(v.to_lowercase()).is_some());
    let stream_connections =
        ews_tls
            .clone()
            .filter(|_| !proxied)
            .map(|tls| exchange::client::StreamConnections {
                tls: Arc::new(tls),
                allow_link_local,
                connect_timeout: CONNECT_TIMEOUT,
                user_agent: USER_AGENT,
            });
    // One connection per client, idle for as long as `idle` allows.
    let ntlm_clients = move |idle: Duration| -> exchange::client::ClientFactory {
        let (ews_builder, ews_tls, shared) = (ews_builder.clone(), ews_tls.clone(), shared.clone());
        Arc::new(move || {
            let builder = ews_builder()
                .pool_max_idle_per_host(1)
                .pool_idle_timeout(idle);
            match &ews_tls {
                Some(tls) => builder.tls_backend_preconfigured(tls.clone()),
                None => builder,
            }
            .build()
            .unwrap_or_else(|_| shared.clone())
        })
    };
    // An NTLM mailbox's calls come in bursts minutes apart; a service account's lanes carry
    // every call of its mailboxes, and keep HTTP's usual 90 s.
    let ews_private = ntlm_clients(Duration::from_secs(config.ews_ntlm_keep_alive_secs));
    let ews_lanes = ntlm_clients(LANE_KEEP_ALIVE);
    let limits = exchange::client::Limits {
        request_timeout: config.request_timeout(),
        max_body_bytes: config.ews_max_body_bytes,
    };
    let settings = engine::worker::WorkerSettings {
        connection_timeout_minutes: config.stream_minutes,
        idle_timeout: Duration::from_secs(config.stream_idle_secs),
        limits,
        retry: config.retry().context("EWS retry settings")?,
        failed_retry: config
            .failed_retry()
            .context("failed-mailbox retry settings")?,
    };
    let delivery = creatio::delivery::Delivery::new(
        http.clone(),
        config.delivery_retry().context("delivery retry settings")?,
        Duration::from_secs(config.delivery_give_up_after_secs),
        config.request_timeout(),
    );
    let (store, store_kind): (Arc<dyn engine::store::Store>, &str) = match config
        .redis()
        .map_err(|e| anyhow::anyhow!(e))?
    {
        None => (
            Arc::new(engine::store::memory::MemoryStore::new(
                engine::store::SeenLimits::default(),
            )),
            "memory",
        ),
        Some(url) => {
            let sealer = config.sealer().map_err(|e| anyhow::anyhow!(e))?;
            match sealer.key_id() {
                None => tracing::warn!(
                    "credentials are kept in Redis in plain text (--insecure-plaintext-credentials)"
                ),
                Some(key_id) => tracing::info!(key_id, "credentials are sealed in Redis"),
            }
            let ca = match &config.redis_ca_file {
                Some(path) => Some(
                    std::fs::read(path)
                        .map_err(|e| anyhow::anyhow!("--redis-ca-file {}: {e}", path.display()))?,
                ),
                None => None,
            };
            let redis = engine::store::redis::RedisStore::connect(
                &url,
                ca,
                &config.redis_prefix,
                sealer,
                engine::store::SeenLimits::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("Redis at {}: {e}", exchange::client::redact_url(&url)))?;
            (Arc::new(redis), "redis")
        }
    };
    let replica = config.replica();
    let leases = Arc::new(engine::coordinator::Leases::new(&replica));
    let cap = usize::try_from(config.max_active_mailboxes).unwrap_or(usize::MAX);
    let accounts = match &config.ews_service_accounts {
        Some(path) => exchange::service_account::ServiceAccounts::load(path)
            .map_err(|e| anyhow::anyhow!(e))?
            .with_retry(
                config
                    .failed_retry()
                    .context("failed-mailbox retry settings")?,
            ),
        None => exchange::service_account::ServiceAccounts::default(),
    };
    if !accounts.is_empty() && config.creatio_hosts.is_empty() {
        anyhow::bail!(
            "--ews-service-accounts needs --creatio-hosts: a mailbox created without a password is read \
             through the service account, so without a list of the Creatio hosts it may post to, \
             anyone who reaches this API could have any mailbox of those servers sent anywhere"
        );
    }
    if !accounts.is_empty() {
        tracing::info!(
            servers = accounts.len(),
            "mailboxes without a password are served through a service account"
        );
    }
    let mut servers =
        exchange::client::Servers::new(config.ews_version, config.ews_auth, ews_private)
            .with_accounts(accounts, ews_lanes);
    if let Some(streams) = stream_connections {
        servers = servers.with_stream_connections(streams);
    }
    let metrics = engine::metrics::Metrics::new();
    let groups = exchange::stream_groups::StreamGroups::new(
        ews_http.clone(),
        servers.clone(),
        limits,
        metrics.shared_streams.clone(),
    );
    let imap_ca_pem = match &config.imap_ca_file {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("--imap-ca-file {}", path.display()))?
        }
        None => Vec::new(),
    };
    let imap = imap::ImapConnect {
        tls: Arc::new(
            shared_tls(&imap_ca_pem, "--imap-ca-file", None)
                .context("the TLS configuration for IMAP servers")?,
        ),
        limits,
        // Each watch reports within half the idle timeout, so a silent one is found, and
        // IDLE is renewed well within the 29 minutes RFC 2177 allows.
        wake: Duration::from_secs(config.imap_poll_secs)
            .min(Duration::from_secs(config.stream_idle_secs) / 2)
            .clamp(Duration::from_secs(1), Duration::from_secs(25 * 60)),
        slots: Arc::new(imap::Slots::new(config.imap_connections_per_user as usize)),
    };
    // Endpoints a mail server pushes to, served beside the API.
    let mut push_endpoints = Vec::new();
    let graph = match &config.graph_apps {
        None => None,
        Some(path) => {
            let apps = graph::GraphApps::load(path).map_err(|e| anyhow::anyhow!(e))?;
            if config.creatio_hosts.is_empty() {
                anyhow::bail!(
                    "--graph-apps needs --creatio-hosts: a mailbox of a served domain is read through the \
                     app, so without a list of the Creatio hosts it may post to, anyone who reaches this \
                     API could have any mailbox of those domains sent anywhere"
                );
            }
            tracing::info!(
                apps = apps.len(),
                "Exchange Online mailboxes of the apps' domains are served through Microsoft Graph"
            );
            // Each poll's wait stays within half the idle timeout, so a watch reports in time.
            let longest = Duration::from_secs(config.graph_poll_max_secs)
                .min(Duration::from_secs(config.stream_idle_secs) / 2)
                .max(Duration::from_secs(1));
            let push = match &config.graph_notification_url {
                None => None,
                Some(url) => {
                    if !(url.starts_with("https://") || url.starts_with("http://")) {
                        anyhow::bail!(
                            "--graph-notification-url {url:?}: an http(s) URL that reaches this listener's {} from Microsoft",
                            graph::notify::PATH
                        );
                    }
                    if !url.starts_with("https://") {
                        tracing::warn!(
                            "--graph-notification-url is not HTTPS: Microsoft Graph delivers notifications only to HTTPS"
                        );
                    }
                    let hints = Arc::new(graph::notify::Hints::default());
                    // A notification reaches any replica; the store passes it to all.
                    if let Some(mut nudges) = store.nudges() {
                        let hints = hints.clone();
                        tokio::spawn(async move {
                            loop {
                                match nudges.recv().await {
                                    Ok(note) => hints.nudged(&note),
                                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                                }
                            }
                        });
                    }
                    push_endpoints.push((
                        graph::notify::PATH,
                        graph::notify::Webhook::start(apps.clone(), store.clone()).route(),
                    ));
                    tracing::info!(
                        "Graph mailboxes take change notifications at --graph-notification-url"
                    );
                    Some(graph::Push {
                        url: url.clone(),
                        hints,
                    })
                }
            };
            Some(Arc::new(graph::GraphConnect {
                http: http.clone(),
                apps,
                limits,
                polling: graph::Polling {
                    min: Duration::from_secs(config.graph_poll_min_secs).min(longest),
                    max: longest,
                },
                push,
            }) as Arc<dyn engine::protocol::Connect>)
        }
    };
    // One line per protocol: the mailbox's `ServerTypeId` chooses.
    let protocols: Arc<dyn engine::protocol::Connect> = Arc::new(engine::protocol::Protocols {
        graph,
        imap: Arc::new(imap),
        exchange: Arc::new(exchange::HttpExchange {
            http: ews_http,
            insecure: config.ews_tls_insecure,
            servers,
            limits,
            groups,
        }),
    });
    let supervisor = engine::supervisor::Supervisor::new(
        engine::worker::WorkerContext {
            store: store.clone(),
            leases: leases.clone(),
            metrics: metrics.clone(),
            servers: protocols.clone(),
            creatio: Arc::new(delivery.clone()),
            settings: Arc::new(settings),
            gate: Arc::new(engine::gate::Gate::new(
                usize::try_from(config.max_active_mailboxes).unwrap_or(usize::MAX),
                config.subscribe_rate,
            )),
        },
        Duration::from_secs(config.unhealthy_after_secs),
        Duration::from_millis(config.lease_ms) * 2,
    );
    let coordinator = engine::coordinator::Coordinator::new(
        engine::coordinator::CoordinatorSettings {
            replica: replica.clone(),
            // Alone in memory, no other replica can take a lease: a heartbeat every second
            // would only cost time. Changes still reach the coordinator at once.
            lease: if store_kind == "memory" {
                LONE_LEASE
            } else {
                Duration::from_millis(config.lease_ms)
            },
            cap,
        },
        store,
        leases,
        supervisor.clone(),
        metrics.clone(),
    );
    let ready = Arc::new(AtomicBool::new(false));
    // Ready once the store answered and this replica registered and claimed its share.
    let coordinating = tokio_util::sync::CancellationToken::new();
    tokio::spawn(
        coordinator
            .clone()
            .run_when_ready(ready.clone(), coordinating.clone()),
    );
    let state = creatio::api::ApiState {
        supervisor: supervisor.clone(),
        servers: protocols,
        creatio_http: http.clone(),
        creatio: Arc::new(delivery),
        reach,
        metrics,
        ready: ready.clone(),
        push_endpoints,
    };
    let http_limits = server::HttpLimits {
        max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
        header_timeout: Duration::from_secs(config.http_header_timeout_secs),
        request_timeout: Duration::from_secs(config.http_request_timeout_secs),
    };
    let grace = Duration::from_secs(config.shutdown_timeout_secs);
    let access = creatio::api::Access {
        token: config
            .api_token()
            .map_err(|e| anyhow::anyhow!(e))?
            .map(Arc::from),
        metrics_elsewhere: config.metrics_listen.is_some(),
    };
    if access.token.is_none() {
        tracing::warn!(
            "the API takes calls from whoever reaches it: give it a token with --api-token-file, or keep it behind a network policy"
        );
    }
    if let Some(at) = config.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("--metrics-listen {at}"))?;
        let addr = metrics
            .local_addr()
            .context("reading the metrics address")?;
        tracing::info!("metrics on http://{addr}/metrics");
        let router = creatio::api::metrics_router(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics, router).await {
                tracing::error!(error = %e, "the metrics address stopped serving");
            }
        });
    }
    let router = server::with_limits(
        creatio::api::router(state, &config.base_path, &access),
        http_limits,
    );
    let addr = listener.local_addr().context("reading the bound address")?;
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let stop_flag = ready.clone();
    let draining = coordinator.clone();
    let drain = Duration::from_secs(config.drain_secs);
    let signal = async move {
        shutdown.await;
        // Not ready at once, so that endpoints forget this replica; the API keeps answering
        // for the drain time, while the mailboxes already hand over.
        stop_flag.store(false, Ordering::Relaxed);
        draining.drain();
        tracing::info!(
            drain_secs = drain.as_secs(),
            "shutting down: the API answers for the drain time, with /readyz 503"
        );
        let _ = stopping_tx.send(());
        tokio::time::sleep(drain).await;
    };
    tracing::info!(store = store_kind, replica = ?replica, "listening on http://{addr}");
    let api = server::serve(listener, router, http_limits, signal, grace);
    // Mailboxes stop (and unsubscribe) while the last requests drain, both within the grace.
    let mailboxes = async {
        let _ = stopping.await;
        // No new claims (the coordinator drains since the signal); the workers stop while
        // their leases are still kept (so no other replica overlaps a post under way);
        // then the leases go back so others take over at once.
        if tokio::time::timeout(grace, supervisor.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("some mailboxes had not unsubscribed when the shutdown timeout passed");
        }
        coordinating.cancel();
        coordinator.leave().await;
    };
    tokio::join!(api, mailboxes);
    tracing::info!("stopped");
    Ok(())
}
