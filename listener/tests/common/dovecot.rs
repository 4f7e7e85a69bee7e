//! A real IMAP server for the tests: Debian's Dovecot, started as a child process with a
//! configuration of its own under a temporary folder (users from a passwd-file, Maildir, no
//! TLS), on a free loopback port. Mail arrives through `doveadm save`, as a delivery would
//! put it there.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;
use tokio::process::{Child, Command};

use super::{PATIENCE, eventually, temp_dir};

/// A running Dovecot; stopped and its folder removed on drop.
pub struct Dovecot {
    child: Child,
    dir: PathBuf,
    config: PathBuf,
    /// Plain text, with STARTTLS when the server has a certificate.
    pub port: u16,
    /// TLS from the first byte, when the server has a certificate.
    pub tls_port: Option<u16>,
}

const INSTALL: &str =
    "install it with `apt-get install dovecot-imapd` (ci/test.sh does when run as root)";

impl Dovecot {
    /// Starts Dovecot with these users (address, password) and waits until it answers.
    pub async fn start(users: &[(&str, &str)]) -> Dovecot {
        Self::start_with(users, false).await
    }

    /// As [`Dovecot::start`], with a certificate for 127.0.0.1 from a CA of the test's own:
    /// STARTTLS on `port`, TLS on `tls_port`. Answers the CA's PEM besides.
    pub async fn start_tls(users: &[(&str, &str)]) -> (Dovecot, Vec<u8>) {
        let dovecot = Self::start_with(users, true).await;
        let ca = std::fs::read(dovecot.dir.join("ca.crt")).unwrap();
        (dovecot, ca)
    }

    async fn start_with(users: &[(&str, &str)], tls: bool) -> Dovecot {
        let dir = temp_dir("dovecot");
        let me = std::fs::metadata(&dir).unwrap();
        // Dovecot will not keep mail as root: root's tests keep it as nobody.
        let (uid, gid) = if me.uid() == 0 {
            (65534, 65534)
        } else {
            (me.uid(), me.gid())
        };
        let mail = dir.join("mail");
        std::fs::create_dir_all(&mail).unwrap();
        for d in [&dir, &mail] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        if me.uid() == 0 {
            std::os::unix::fs::chown(&mail, Some(uid), Some(gid)).unwrap();
        }
        let passwd: String = users
            .iter()
            .map(|(user, password)| format!("{user}:{{PLAIN}}{password}::::::\n"))
            .collect();
        std::fs::write(dir.join("users"), passwd).unwrap();
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let port = free_port();
        let tls_port = tls.then(free_port);
        let ssl = match tls_port {
            Some(tls_port) => {
                super::test_certificates(&dir);
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
                 protocol imap {{\n  mail_max_userip_connections = 1000\n}}\n"
            ),
        )
        .unwrap();
        let child = Self::serve(&config, port).await;
        Dovecot {
            child,
            dir,
            config,
            port,
            tls_port,
        }
    }

    async fn serve(config: &std::path::Path, port: u16) -> Child {
        let spawn = || {
            Command::new("dovecot")
                .arg("-F")
                .arg("-c")
                .arg(config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start dovecot ({e}); {INSTALL}"))
        };
        let mut child = spawn();
        eventually("dovecot to accept connections", PATIENCE, async || {
            // A master started again while the last one's processes still hold the port
            // gives up at once: start it once more.
            if let Ok(Some(_)) = child.try_wait() {
                child = spawn();
            }
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        child
    }

    /// Kills the server (every connection drops at once); the mail stays.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
        eventually("dovecot to stop listening", PATIENCE, async || {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_err()
                .then_some(())
        })
        .await;
    }

    /// Starts the server again, on the same port and mail.
    pub async fn start_again(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("run").join("master.pid"));
        self.child = Self::serve(&self.config, self.port).await;
    }

    /// Puts a mail (its whole MIME text) into a user's folder.
    pub async fn deliver_to(&self, user: &str, folder: &str, mime: &str) {
        let mut save = Command::new("doveadm")
            .arg("-c")
            .arg(&self.config)
            .args(["save", "-u", user, "-m", folder])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run doveadm ({e}); {INSTALL}"));
        let mut stdin = save.stdin.take().unwrap();
        stdin.write_all(mime.as_bytes()).await.unwrap();
        drop(stdin);
        let status = save.wait().await.unwrap();
        assert!(status.success(), "doveadm save failed: {status}");
    }

    /// Puts a mail straight into a user's inbox Maildir, as a delivery agent does while the
    /// IMAP server is down (doveadm needs the server's auth service).
    pub fn deliver_offline(&self, user: &str, mime: &str) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let root = self.dir.join("mail").join(user);
        let owner = std::fs::metadata(&root).unwrap();
        let name = format!(
            "{}.M{}P{}.test",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::process::id()
        );
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
            std::os::unix::fs::chown(root.join(sub), Some(owner.uid()), Some(owner.gid())).unwrap();
        }
        let tmp = root.join("tmp").join(&name);
        std::fs::write(&tmp, mime).unwrap();
        std::os::unix::fs::chown(&tmp, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::rename(&tmp, root.join("new").join(&name)).unwrap();
    }

    /// Creates a folder in a user's mailbox.
    pub async fn create_folder(&self, user: &str, folder: &str) {
        let status = Command::new("doveadm")
            .arg("-c")
            .arg(&self.config)
            .args(["mailbox", "create", "-u", user, folder])
            .status()
            .await
            .unwrap_or_else(|e| panic!("cannot run doveadm ({e}); {INSTALL}"));
        assert!(status.success(), "doveadm mailbox create failed: {status}");
    }

    /// Dovecot's own log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
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
