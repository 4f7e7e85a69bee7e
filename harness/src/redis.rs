//! The Redis a scenario runs on: a container through testcontainers whenever a Docker engine
//! answers (its image built here from the host's `redis-server`, since no registry can be
//! reached), else a `redis-server` process the harness owns, or an external one by URL. It can
//! be restarted empty and paused, as a timeline asks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use testcontainers::core::{IntoContainerPort as _, WaitFor};
use testcontainers::runners::AsyncRunner as _;
use testcontainers::{ContainerAsync, GenericImage};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

/// Which Redis to run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A container when a Docker engine answers, else a process.
    Auto,
    Container,
    Process,
    External(String),
}

impl Choice {
    /// `Auto` settled once: a container when a Docker engine answers, else a process (said
    /// on stderr). Other choices stay as they are.
    pub async fn resolved(self) -> Choice {
        match self {
            Choice::Auto if docker_answers().await => Choice::Container,
            Choice::Auto => {
                eprintln!(
                    "harness: no Docker engine answers; running redis-server as a process instead"
                );
                Choice::Process
            }
            other => other,
        }
    }
}

const IMAGE: &str = "exchange-listener-redis";
const INSTALL: &str = "install it with `apt-get install redis-server`";

enum Inner {
    Container(Box<ContainerAsync<GenericImage>>),
    Process(Box<ServerProcess>),
    External,
}

/// A `redis-server` child, restarted on the same port.
struct ServerProcess {
    child: tokio::process::Child,
    port: u16,
    dir: PathBuf,
}

/// A running Redis.
pub struct Redis {
    inner: Inner,
    addr: SocketAddr,
    /// What the report calls it.
    pub backend: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("backend", &self.backend)
            .field("addr", &self.addr)
            .finish()
    }
}

impl Redis {
    /// Starts (or reaches) the Redis `choice` names; `dir` takes a process's files.
    pub async fn start(choice: &Choice, dir: &Path) -> anyhow::Result<Redis> {
        match choice.clone().resolved().await {
            Choice::External(url) => {
                let rest = url
                    .strip_prefix("redis://")
                    .context("--redis-url must start with redis://")?;
                let host_port = rest.rsplit('@').next().unwrap_or(rest);
                let host_port = host_port.split('/').next().unwrap_or(host_port);
                let addr = tokio::net::lookup_host(host_port)
                    .await
                    .with_context(|| format!("resolving {host_port}"))?
                    .next()
                    .with_context(|| format!("{host_port} resolves to nothing"))?;
                Ok(Redis {
                    inner: Inner::External,
                    addr,
                    backend: format!("external Redis at {host_port}"),
                })
            }
            Choice::Container => Redis::container().await,
            Choice::Process | Choice::Auto => Redis::process(dir).await,
        }
    }

    async fn container() -> anyhow::Result<Redis> {
        let tag = ensure_image().await?;
        let container = GenericImage::new(IMAGE, tag.as_str())
            .with_exposed_port(6379.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .start()
            .await
            .context("starting the Redis container")?;
        let port = container.get_host_port_ipv4(6379.tcp()).await?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(Redis {
            inner: Inner::Container(Box::new(container)),
            addr,
            backend: format!("testcontainers ({IMAGE}:{tag})"),
        })
    }

    async fn process(dir: &Path) -> anyhow::Result<Redis> {
        let port = free_port()?;
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir)?;
        let child = spawn_server(port, &dir, &[])?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_ready(addr).await?;
        Ok(Redis {
            inner: Inner::Process(Box::new(ServerProcess { child, port, dir })),
            addr,
            backend: "redis-server process".into(),
        })
    }

    /// Where Redis listens now (it may move when restarted).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops Redis hard and, after `down`, starts it again with no data, as a crash of a
    /// cache-only Redis does (a rescheduled pod takes a while); answers once it takes
    /// commands again.
    pub async fn restart_empty(&mut self, down: Duration) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Container(c) => {
                c.stop_with_timeout(Some(0)).await?;
                tokio::time::sleep(down).await;
                c.start().await?;
                let port = c.get_host_port_ipv4(6379.tcp()).await?;
                self.addr = SocketAddr::from(([127, 0, 0, 1], port));
            }
            Inner::Process(p) => {
                let _ = p.child.kill().await;
                tokio::time::sleep(down).await;
                p.child = spawn_server(p.port, &p.dir, &[])?;
            }
            Inner::External => bail!("an external Redis cannot be restarted by the harness"),
        }
        wait_ready(self.addr).await
    }

    /// Freezes Redis (it keeps its connections and answers nothing) or thaws it.
    pub async fn freeze(&self, frozen: bool) -> anyhow::Result<()> {
        match &self.inner {
            Inner::Container(c) if frozen => c.pause().await?,
            Inner::Container(c) => c.unpause().await?,
            Inner::Process(p) => {
                let pid = p.child.id().context("redis-server is gone")?;
                let signal = if frozen { "-STOP" } else { "-CONT" };
                let status = tokio::process::Command::new("kill")
                    .args([signal, &pid.to_string()])
                    .status()
                    .await?;
                if !status.success() {
                    bail!("kill {signal} {pid} failed");
                }
            }
            Inner::External => bail!("an external Redis cannot be paused by the harness"),
        }
        Ok(())
    }

    /// True when the harness can restart and pause it.
    pub fn owned(&self) -> bool {
        !matches!(self.inner, Inner::External)
    }
}

/// A free loopback port.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `redis-server` on a loopback port, keeping nothing on disk, with `extra` flags.
pub(crate) fn spawn_server(
    port: u16,
    dir: &Path,
    extra: &[String],
) -> anyhow::Result<tokio::process::Child> {
    spawn(
        tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra),
    )
}

/// Starts a `redis-server` command, its output dropped, killed with its handle.
pub(crate) fn spawn(
    command: &mut tokio::process::Command,
) -> anyhow::Result<tokio::process::Child> {
    command
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting redis-server; {INSTALL}"))
}

/// Waits until Redis (or a sentinel) answers PING.
pub(crate) async fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if ping(addr).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("Redis at {addr} did not answer PING within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn ping(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await?;
        Ok::<bool, std::io::Error>(&buf == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(true))
    )
}

/// How many times Redis at `addr` has run each command since it started (`INFO
/// commandstats`; commands a script runs are counted as well as the script's call).
pub async fn command_counts(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    let read = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"INFO commandstats\r\n").await?;
        let mut reader = tokio::io::BufReader::new(s);
        let mut head = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut head).await?;
        let len: usize = head
            .trim_end()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .context("INFO answered no bulk string")?;
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).await?;
        anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("INFO commandstats took over 5 s")??;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let calls = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        counts.insert(name.to_ascii_uppercase(), calls);
    }
    Ok(counts)
}

/// Commands a second by command between two [`command_counts`] taken `secs` apart, busiest
/// first, leaving out the ones that read them.
pub fn command_rates(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    secs: f64,
) -> Vec<(String, f64)> {
    let mut rates: Vec<(String, f64)> = after
        .iter()
        .filter(|(name, _)| name.as_str() != "INFO")
        .map(|(name, n)| {
            let was = before.get(name).copied().unwrap_or(0);
            (name.clone(), n.saturating_sub(was) as f64 / secs)
        })
        .filter(|(_, r)| *r > 0.0)
        .collect();
    rates.sort_by(|a, b| b.1.total_cmp(&a.1));
    rates
}

/// True when a Docker engine answers.
pub async fn docker_answers() -> bool {
    let info = tokio::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    matches!(
        tokio::time::timeout(Duration::from_secs(10), info).await,
        Ok(Ok(s)) if s.success()
    )
}

/// The tag of a local Redis image made from the host's `redis-server`, built when missing:
/// `FROM scratch` with the binary and the libraries it links (the same recipe as
/// `docker/redis.Dockerfile`).
async fn ensure_image() -> anyhow::Result<String> {
    let server =
        which("redis-server").with_context(|| format!("redis-server is missing; {INSTALL}"))?;
    let version = std::process::Command::new(&server)
        .arg("--version")
        .output()
        .context("running redis-server --version")?;
    let version = String::from_utf8_lossy(&version.stdout);
    let tag = version
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or("local")
        .to_owned();
    let present = tokio::process::Command::new("docker")
        .args(["image", "inspect", &format!("{IMAGE}:{tag}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?;
    if present.success() {
        return Ok(tag);
    }
    eprintln!(
        "harness: building the image {IMAGE}:{tag} from {}",
        server.display()
    );
    let dir = std::env::temp_dir().join(format!("harness-redis-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    stage_rootfs(&server, &dir.join("rootfs"))?;
    std::fs::write(
        dir.join("Dockerfile"),
        include_str!("../../docker/redis.Dockerfile"),
    )?;
    let built = tokio::process::Command::new("docker")
        .args(["build", "-q", "-t", &format!("{IMAGE}:{tag}")])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running docker build")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !built.success() {
        bail!("docker build of {IMAGE}:{tag} failed");
    }
    Ok(tag)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Lays out the smallest root file system `binary` runs in.
fn stage_rootfs(binary: &Path, root: &Path) -> anyhow::Result<()> {
    let bin = root.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(root.join("tmp"))?;
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::copy(
        binary,
        bin.join(binary.file_name().context("no file name")?),
    )?;
    let ldd = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().context("a library without a folder")?)?;
        std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
    }
    std::fs::write(
        root.join("etc/passwd"),
        "app:x:10001:10001:app:/tmp:/sbin/nologin\n",
    )?;
    std::fs::write(root.join("etc/group"), "app:x:10001:\n")?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}
