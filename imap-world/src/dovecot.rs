//! A real IMAP server for tests and scenarios: Debian's Dovecot, started as a child process with a
//! configuration of its own under a temporary folder (users from a passwd-file, Maildir, no
//! TLS), on a free loopback port. Mail arrives through `doveadm save`, as a delivery would
//! put it there.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;
use tokio::process::{Child, Command};

use anyhow::Context as _;

use super::within;

/// How long Dovecot may take to start or stop.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// A fresh folder under the system's temporary one.
fn temp_dir() -> anyhow::Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "el-dovecot-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// How a Dovecot is started.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A certificate for 127.0.0.1 from a CA of the test's own: STARTTLS on `port`, TLS on
    /// `tls_port`.
    pub tls: bool,
    /// Sized to hold this many IMAP connections at once (0: Dovecot's defaults, a process a
    /// connection and a hundred at most): a login process serves them all, and an IMAP
    /// process a hundred.
    pub connections: usize,
    /// Connections a user may hold from one address (`mail_max_userip_connections`).
    pub connections_per_user: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: false,
            connections: 0,
            connections_per_user: 1000,
        }
    }
}

/// A running Dovecot; stopped and its folder removed on drop.
pub struct Dovecot {
    /// The master process; replaced when the server is started again.
    child: tokio::sync::Mutex<Child>,
    dir: PathBuf,
    config: PathBuf,
    /// Plain text, with STARTTLS when the server has a certificate.
    pub port: u16,
    /// TLS from the first byte, when the server has a certificate.
    pub tls_port: Option<u16>,
}

impl std::fmt::Debug for Dovecot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dovecot")
            .field("port", &self.port)
            .field("tls_port", &self.tls_port)
            .finish_non_exhaustive()
    }
}

const INSTALL: &str =
    "install it with `apt-get install dovecot-imapd` (ci/test.sh does when run as root)";

impl Dovecot {
    /// Starts Dovecot with these users (address, password) and waits until it answers.
    pub async fn start(users: &[(&str, &str)]) -> anyhow::Result<Dovecot> {
        Ok(Self::start_with(users, Options::default()).await?.0)
    }

    /// As [`Dovecot::start`], with a certificate for 127.0.0.1 from a CA of the test's own:
    /// STARTTLS on `port`, TLS on `tls_port`. Answers the CA's PEM besides.
    pub async fn start_tls(users: &[(&str, &str)]) -> anyhow::Result<(Dovecot, Vec<u8>)> {
        let tls = Options {
            tls: true,
            ..Options::default()
        };
        Self::start_with(users, tls).await
    }

    /// Starts Dovecot as `options` say; answers it and its CA's PEM (empty without TLS).
    pub async fn start_with(
        users: &[(&str, &str)],
        options: Options,
    ) -> anyhow::Result<(Dovecot, Vec<u8>)> {
        let dovecot = Self::configure_and_start(users, &options).await?;
        let ca = if options.tls {
            std::fs::read(dovecot.dir.join("ca.crt"))?
        } else {
            Vec::new()
        };
        Ok((dovecot, ca))
    }

    async fn configure_and_start(
        users: &[(&str, &str)],
        options: &Options,
    ) -> anyhow::Result<Dovecot> {
        let Options {
            tls,
            connections,
            connections_per_user,
        } = *options;
        let dir = temp_dir()?;
        let me = std::fs::metadata(&dir)?;
        // Dovecot will not keep mail as root: root's tests keep it as nobody.
        let (uid, gid) = if me.uid() == 0 {
            (65534, 65534)
        } else {
            (me.uid(), me.gid())
        };
        let mail = dir.join("mail");
        std::fs::create_dir_all(&mail)?;
        for d in [&dir, &mail] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        if me.uid() == 0 {
            std::os::unix::fs::chown(&mail, Some(uid), Some(gid))?;
        }
        let passwd: String = users
            .iter()
            .map(|(user, password)| format!("{user}:{{PLAIN}}{password}::::::\n"))
            .collect();
        std::fs::write(dir.join("users"), passwd)?;
        let free_port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let port = free_port()?;
        let tls_port = if tls { Some(free_port()?) } else { None };
        let ssl = match tls_port {
            Some(tls_port) => {
                mock_ews::test_certificates(&dir)?;
                let d = dir.display();
                format!(
                    "ssl = yes\nssl_cert = <{d}/server.crt\nssl_key = <{d}/server.key\n\
                     service imap-login {{\n  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {tls_port}\n    ssl = yes\n  }}\n}}\n"
                )
            }
            None => {
                "ssl = no\nservice imap-login {\n  inet_listener imaps {\n    port = 0\n  }\n}\n"
                    .to_owned()
            }
        };
        let unprivileged = if me.uid() == 0 {
            String::new()
        } else {
            let user = std::process::Command::new("id")
                .arg("-un")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            format!(
                "default_internal_user = {user}\ndefault_login_user = {user}\ndefault_internal_group = {user}\n"
            )
        };
        let sized = if connections > 0 {
            let clients = connections + 100;
            let imap_processes = connections / 100 + 10;
            format!(
                "default_client_limit = {clients}\n\
                 service imap {{\n  service_count = 0\n  client_limit = 100\n  process_limit = {imap_processes}\n  vsz_limit = 1G\n}}\n\
                 service imap-login {{\n  service_count = 0\n  client_limit = {clients}\n  process_min_avail = 4\n  process_limit = 8\n  vsz_limit = 1G\n}}\n"
            )
        } else {
            String::new()
        };
        let d = dir.display();
        let config = dir.join("dovecot.conf");
        std::fs::write(
            &config,
            format!(
                "protocols = imap\n\
                 listen = 127.0.0.1\n\
                 base_dir = {d}/run\n\
                 state_dir = {d}/state\n\
                 log_path = {d}/dovecot.log\n\
                 {ssl}\
                 disable_plaintext_auth = no\n\
                 auth_mechanisms = plain login\n\
                 mail_location = maildir:{d}/mail/%u\n\
                 mail_uid = {uid}\n\
                 mail_gid = {gid}\n\
                 first_valid_uid = 1\n\
                 {unprivileged}\
                 passdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n\
                 userdb {{\n  driver = static\n  args = uid={uid} gid={gid} home={d}/mail/%u\n}}\n\
                 service imap-login {{\n  chroot =\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n}}\n\
                 service anvil {{\n  chroot =\n}}\n\
                 protocol imap {{\n  mail_max_userip_connections = {connections_per_user}\n}}\n\
                 {sized}"
            ),
        )?;
        let child = Self::serve(&config, port).await?;
        Ok(Dovecot {
            child: tokio::sync::Mutex::new(child),
            dir,
            config,
            port,
            tls_port,
        })
    }

    async fn serve(config: &std::path::Path, port: u16) -> anyhow::Result<Child> {
        let spawn = || {
            Command::new("dovecot")
                .arg("-F")
                .arg("-c")
                .arg(config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group: the server is its master and every process it starts
                // (logins, one per IMAP session), which stopping it must end together.
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start dovecot; {INSTALL}"))
        };
        let mut child = spawn()?;
        within("dovecot to accept connections", PATIENCE, async || {
            // A master started again while the last one's processes still hold the port
            // gives up at once: start it once more.
            if let Ok(Some(_)) = child.try_wait()
                && let Ok(again) = spawn()
            {
                child = again;
            }
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await?;
        Ok(child)
    }

    /// Kills the server, every process of it (every connection drops at once); the mail
    /// stays.
    pub async fn kill(&self) -> anyhow::Result<()> {
        let mut child = self.child.lock().await;
        kill_group(&child);
        let _ = child.kill().await;
        drop(child);
        within("dovecot to stop listening", PATIENCE, async || {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_err()
                .then_some(())
        })
        .await
    }

    /// Starts the server again, on the same port and mail.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(self.dir.join("run").join("master.pid"));
        *self.child.lock().await = Self::serve(&self.config, self.port).await?;
        Ok(())
    }

    /// Puts a mail (its whole MIME text) into a user's folder.
    pub async fn deliver_to(&self, user: &str, folder: &str, mime: &str) -> anyhow::Result<()> {
        let mut save = Command::new("doveadm")
            .arg("-c")
            .arg(&self.config)
            .args(["save", "-u", user, "-m", folder])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run doveadm; {INSTALL}"))?;
        let mut stdin = save.stdin.take().context("doveadm's input")?;
        stdin.write_all(mime.as_bytes()).await?;
        drop(stdin);
        let status = save.wait().await?;
        anyhow::ensure!(status.success(), "doveadm save failed: {status}");
        Ok(())
    }

    /// Puts a mail straight into a user's inbox Maildir, as a delivery agent does while the
    /// IMAP server is down (doveadm needs the server's auth service).
    pub fn deliver_offline(&self, user: &str, mime: &str) -> anyhow::Result<()> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let root = self.dir.join("mail").join(user);
        let owner = std::fs::metadata(&root)?;
        let name = format!(
            "{}.M{}P{}.test",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::process::id()
        );
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(root.join(sub))?;
            std::os::unix::fs::chown(root.join(sub), Some(owner.uid()), Some(owner.gid()))?;
        }
        let tmp = root.join("tmp").join(&name);
        std::fs::write(&tmp, mime)?;
        std::os::unix::fs::chown(&tmp, Some(owner.uid()), Some(owner.gid()))?;
        std::fs::rename(&tmp, root.join("new").join(&name))?;
        Ok(())
    }

    /// Creates a folder in a user's mailbox.
    pub async fn create_folder(&self, user: &str, folder: &str) -> anyhow::Result<()> {
        let status = Command::new("doveadm")
            .arg("-c")
            .arg(&self.config)
            .args(["mailbox", "create", "-u", user, folder])
            .status()
            .await
            .with_context(|| format!("cannot run doveadm; {INSTALL}"))?;
        anyhow::ensure!(status.success(), "doveadm mailbox create failed: {status}");
        Ok(())
    }

    /// How many TCP connections to the server (either port) are open now, counted on the clients' side
    /// from the kernel's table (`/proc/net/tcp` and `tcp6`).
    pub fn connections(&self) -> usize {
        let ports: Vec<String> = std::iter::once(self.port)
            .chain(self.tls_port)
            .map(|p| format!("{p:04X}"))
            .collect();
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .map(|text| {
                text.lines()
                    .skip(1)
                    .filter(|line| {
                        let mut fields = line.split_whitespace().skip(2);
                        // The remote address, then the state: 01 is ESTABLISHED.
                        let remote = fields.next().unwrap_or_default();
                        let state = fields.next().unwrap_or_default();
                        let remote_port = remote.rsplit(':').next().unwrap_or_default();
                        ports.iter().any(|p| p == remote_port) && state == "01"
                    })
                    .count()
            })
            .sum()
    }

    /// Dovecot's own log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.try_lock() {
            kill_group(&child);
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `kill -KILL` to the child's process group: the master and the processes it started.
fn kill_group(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
}

/// A small mail as a client would send it.
pub fn mail(from: &str, to: &str, subject: &str, message_id: &str) -> String {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n\
         Date: Tue, 01 Dec 2026 08:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n{subject}, in a few words.\r\n"
    )
}
