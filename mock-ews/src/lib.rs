//! An Exchange Web Services server for tests and demos.
//!
//! It speaks EWS over HTTP (Basic auth; Subscribe, GetStreamingEvents, GetItem, Unsubscribe,
//! GetFolder, FindFolder, FindItem, SyncFolderItems) and offers a JSON control API under `/_control/` to create mailboxes and inject
//! mail. As a library it starts on any address (port 0 in tests) and returns a [`MockEws`]
//! handle whose typed methods do what the control API does; the binary is a thin wrapper.

pub mod clock;
mod control;
pub mod faults;
mod folders;
mod mail;
mod ntlm;
mod ops;
mod server;
mod soap;
mod state;
mod streaming;
mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use faults::{Fault, FaultKind, Settings};
pub use mail::{Attachment, InjectedMail, NewMail, Rate, Rendered, SentMail, generated, render};
pub use state::{ControlError, RequestRecord, Stats};

/// A SOAP request envelope around `body` (an operation element using the `m:` and `t:`
/// prefixes), as the mock's own tests and tools send it. The listener builds its requests with
/// the `ews` crate instead, so the two never share one writer.
pub fn request_envelope(body: &str) -> String {
    format!(
        concat!(
            r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/""#,
            r#" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types""#,
            r#" xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">"#,
            r#"<soap:Header><t:RequestServerVersion Version="Exchange2013_SP1"/></soap:Header><soap:Body>{}</soap:Body></soap:Envelope>"#
        ),
        body
    )
}

/// How the server behaves on streaming connections.
#[derive(Debug, Clone)]
pub struct Config {
    /// Interval of `ConnectionStatus OK` keep-alives on an idle stream.
    pub keepalive: Duration,
    /// Ends every stream with `Closed` after this long, even if the client asked for longer
    /// (its `ConnectionTimeout` is in minutes; tests want reconnects within seconds).
    pub max_connection_time: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keepalive: Duration::from_secs(45),
            max_connection_time: None,
        }
    }
}

/// A running mock EWS server. Dropping it stops the server.
#[derive(Debug)]
pub struct MockEws {
    addr: SocketAddr,
    /// `http`, or `https` when started with a certificate.
    scheme: &'static str,
    world: Arc<state::World>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl MockEws {
    /// Binds `addr` and serves the world, over TLS when given an acceptor.
    async fn serve(
        addr: SocketAddr,
        config: Config,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<MockEws> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let world = Arc::new(state::World::default());
        let shutdown = CancellationToken::new();
        let ntlm = Arc::<ntlm::Connections>::default();
        let app = server::App {
            world: world.clone(),
            config,
            shutdown: shutdown.clone(),
            ntlm: ntlm.clone(),
        };
        let router = server::router(app);
        let stop = shutdown.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let local = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Each connection's task holds a sender: all of them gone, every connection ended.
            let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
            let mut serial = 0;
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, or a connection reset while queued: the
                        // server goes on.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                serial += 1;
                let connection = ntlm::ConnectionId(serial);
                let (tls, router, ntlm, stop, open) = (
                    tls.clone(),
                    router.clone(),
                    ntlm.clone(),
                    stop.clone(),
                    open.clone(),
                );
                tokio::spawn(async move {
                    // Each request knows its connection: NTLM authenticates connections.
                    let router = router.layer(axum::Extension(connection));
                    match tls {
                        Some(acceptor) => {
                            // A client that refuses the certificate ends the handshake.
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_connection(stream, router, &stop).await;
                            }
                        }
                        None => serve_connection(tcp, router, &stop).await,
                    }
                    // What a connection authenticated ends with it: a later connection, even
                    // from the same address and port, is a stranger.
                    ntlm.forget(connection);
                    drop(open);
                });
            }
            drop(open);
            let _ = all_closed.recv().await;
            Ok(())
        });
        Ok(MockEws {
            addr: local,
            scheme,
            world,
            shutdown,
            task: Some(task),
        })
    }

    /// Binds `addr` (use port 0 for any free port) and serves until dropped or shut down.
    pub async fn start(addr: SocketAddr, config: Config) -> std::io::Result<MockEws> {
        MockEws::serve(addr, config, None).await
    }

    /// Like [`MockEws::start`], but serving HTTPS with this certificate chain and key (PEM), as
    /// an on-premises Exchange does with a certificate from the company's own CA.
    pub async fn start_tls(
        addr: SocketAddr,
        config: Config,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> std::io::Result<MockEws> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let invalid = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid(&e))?;
        let tls = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| invalid(&e))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        MockEws::serve(addr, config, Some(acceptor)).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The EWS endpoint URL, `http://ADDR/EWS/Exchange.asmx`.
    pub fn ews_url(&self) -> String {
        format!("{}://{}/EWS/Exchange.asmx", self.scheme, self.addr)
    }

    pub fn create_mailbox(&self, email: &str, password: &str) -> Result<(), ControlError> {
        self.world.create_mailbox(email, password)
    }

    pub fn set_password(&self, email: &str, password: &str) -> Result<(), ControlError> {
        self.world.set_password(email, password)
    }

    /// Delivers a mail into the mailbox's inbox, firing its notification events.
    pub fn inject(&self, mailbox: &str, mail: NewMail) -> Result<InjectedMail, ControlError> {
        self.world.inject(mailbox, mail)
    }

    /// The most recent EWS requests (up to 10,000), oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.world.request_log()
    }

    /// The mailbox server a mailbox lives on (see [`Settings::backends`]).
    pub fn backend_of(&self, mailbox: &str) -> String {
        self.world.backend_of(mailbox)
    }

    pub fn delete_mailbox(&self, email: &str) -> Result<(), ControlError> {
        self.world.delete_mailbox(email)
    }

    /// Delivers generated mails `first..first + count` of sequence `seed` (see [`generated`]).
    pub fn inject_batch(
        &self,
        mailbox: &str,
        seed: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<InjectedMail>, ControlError> {
        traffic::batch(&self.world, mailbox, seed, first, count)
    }

    /// Delivers generated mail at a steady rate in the background; the task answers how many
    /// mails it delivered. It stops early when the server shuts down.
    pub fn inject_at_rate(&self, rate: Rate) -> Result<JoinHandle<u64>, ControlError> {
        rate.validate().map_err(|reason| ControlError::Invalid {
            field: "rate",
            reason,
        })?;
        Ok(tokio::spawn(traffic::at_rate(
            self.world.clone(),
            rate,
            self.shutdown.clone(),
        )))
    }

    /// Every mail in a mailbox, in delivery order.
    pub fn sent(&self, mailbox: &str) -> Result<Vec<SentMail>, ControlError> {
        self.world.sent(mailbox)
    }

    /// What a mailbox sent through CreateItem, oldest first (its Sent Items).
    pub fn outgoing(&self, mailbox: &str) -> Result<Vec<SentMail>, ControlError> {
        self.world.outgoing(mailbox)
    }

    pub fn stats(&self) -> Stats {
        self.world.stats()
    }

    /// Arms a fault (see [`FaultKind`] for what each does).
    pub fn inject_fault(&self, fault: Fault) -> Result<(), ControlError> {
        self.world.add_fault(fault)
    }

    /// The faults still armed.
    pub fn faults(&self) -> Vec<Fault> {
        self.world.faults()
    }

    pub fn clear_faults(&self) {
        self.world.clear_faults()
    }

    /// Limits and subscription expiry.
    pub fn set_settings(&self, settings: Settings) {
        self.world.set_settings(settings)
    }

    pub fn settings(&self) -> Settings {
        self.world.settings()
    }

    /// Ends every stream with `Closed`, stops accepting, and waits for the server to finish.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for MockEws {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves one connection's requests until it closes; once the server stops, until the answer
/// in flight is sent (a stream's ends with `Closed`).
async fn serve_connection<S>(io: S, router: axum::Router, stop: &CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = stop.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// A CA of its own and a certificate it signed for 127.0.0.1, made with `openssl` in `dir`
/// (`ca.crt`, `server.crt`, `server.key`), for serving HTTPS as an on-premises Exchange with
/// an internal CA does. Answers their PEM: CA, certificate, key.
pub fn test_certificates(dir: &std::path::Path) -> std::io::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let openssl = |args: &[&str]| -> std::io::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| {
                std::io::Error::other(format!("openssl is needed ({e}); apt-get install openssl"))
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("openssl {args:?}: {out:?}")))
        }
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ])?;
    let read = |name: &str| std::fs::read(dir.join(name));
    Ok((read("ca.crt")?, read("server.crt")?, read("server.key")?))
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
