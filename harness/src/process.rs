//! The workspace's binaries as child processes: found (or built) once, started on a free
//! loopback port, their address read from the line where they say they listen, their memory and
//! CPU read from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

/// How long a binary may take to say where it listens.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// The release build of each named workspace binary. Run through cargo (`CARGO` is set), it
/// builds them first so a measurement never runs stale code; otherwise it takes the ones next to
/// this executable.
pub fn release_binaries(names: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let profile_dir = exe.parent().context("executable without a folder")?;
    let release_dir = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("release") => profile_dir.to_path_buf(),
        _ => profile_dir
            .parent()
            .context("executable outside a target folder")?
            .join("release"),
    };
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--release", "--quiet", "--workspace"]);
        for name in names {
            build.args(["--bin", name]);
        }
        let status = build.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --release of {names:?} failed");
        }
    }
    names
        .iter()
        .map(|name| {
            let path = release_dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                bail!(
                    "{} is missing; build it with `cargo build --release --bin {name}`",
                    path.display()
                )
            }
        })
        .collect()
}

/// The release binaries the harness runs together.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub listener: PathBuf,
    pub ews: PathBuf,
    pub creatio: PathBuf,
    pub graph: PathBuf,
}

impl Binaries {
    /// The listener, mock-ews, mock-creatio and mock-graph, as [`release_binaries`] finds
    /// them.
    pub fn release() -> anyhow::Result<Binaries> {
        let [listener, ews, creatio, graph]: [PathBuf; 4] = release_binaries(&[
            "exchange-listener",
            "mock-ews",
            "mock-creatio",
            "mock-graph",
        ])?
        .try_into()
        .map_err(|_| anyhow::anyhow!("four binaries expected"))?;
        Ok(Binaries {
            listener,
            ews,
            creatio,
            graph,
        })
    }
}

/// A running child process, killed when dropped.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub pid: u32,
    /// What it printed after "listening on ", e.g. `http://127.0.0.1:40123`.
    pub base: String,
    child: Child,
}

impl Process {
    /// Starts `binary` with `args` and waits for its "listening on URL" line. Its output (stdout,
    /// where the workspace's binaries log) goes to `log`, so a busy process never blocks on a
    /// full pipe.
    pub async fn start(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: &Path,
    ) -> anyhow::Result<Process> {
        let mut child = Command::new(binary)
            .args(args)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let mut file = tokio::fs::File::create(log)
            .await
            .with_context(|| format!("creating {}", log.display()))?;
        let base = tokio::time::timeout(START_PATIENCE, async {
            while let Some(line) = lines.next_line().await? {
                file.write_all(line.as_bytes()).await?;
                file.write_all(b"\n").await?;
                if let Some(rest) = line.split("listening on ").nth(1) {
                    return Ok(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
            bail!("{name} exited before listening; see {}", log.display())
        })
        .await
        .with_context(|| format!("{name} did not say where it listens"))??;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if file.write_all(line.as_bytes()).await.is_err()
                    || file.write_all(b"\n").await.is_err()
                {
                    break;
                }
            }
        });
        Ok(Process {
            name: name.to_owned(),
            pid,
            base,
            child,
        })
    }

    /// Its memory and CPU time now.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        Usage::of(self.pid).with_context(|| format!("reading /proc of {}", self.name))
    }

    /// How many sockets it holds open now (its TCP connections and listeners), from `/proc`.
    pub fn sockets(&self) -> anyhow::Result<usize> {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .with_context(|| format!("reading /proc of {}", self.name))?;
        Ok(fds
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count())
    }

    /// `kill -9`.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then waits for the exit; after `patience` it is killed. Answers whether it
    /// exited by itself with status 0.
    pub async fn terminate(mut self, patience: Duration) -> bool {
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .is_ok_and(|s| s.success());
        if sent && let Ok(Ok(status)) = tokio::time::timeout(patience, self.child.wait()).await {
            return status.success();
        }
        let _ = self.child.kill().await;
        false
    }
}

/// Resident memory and CPU time of a process, from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    /// User plus system time, in clock ticks.
    pub cpu_ticks: u64,
}

impl Usage {
    pub fn of(pid: u32) -> anyhow::Result<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |field: &str| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name (in parentheses); utime and stime are the 12th and
        // 13th of them.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        Ok(Usage {
            rss_kib: kib("VmRSS:"),
            peak_rss_kib: kib("VmHWM:"),
            cpu_ticks: fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0),
        })
    }

    /// Percent of one core used between `earlier` and this sample, `secs` apart.
    pub fn cpu_percent_since(&self, earlier: &Usage, secs: f64) -> f64 {
        if secs <= 0.0 {
            return 0.0;
        }
        self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 / clock_ticks_per_second() / secs
            * 100.0
    }
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A folder for the run's logs and reports under the target folder.
pub fn run_dir(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .nth(2)
        .context("executable outside a target folder")?;
    let dir = target.join("harness").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
