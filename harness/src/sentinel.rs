//! Redis behind Sentinel for a scenario: a master, one replica of it, and three sentinels
//! watching it as `el` (down after 1 s), each a `redis-server` process on a loopback port that
//! the harness owns. The master can be killed; Sentinel then promotes the replica.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};
use tokio::time::Instant;

const INSTALL: &str = "install it with `apt-get install redis-server`";

/// The processes, killed when dropped.
#[derive(Debug)]
pub struct SentinelSet {
    master: Option<Child>,
    _others: Vec<Child>,
    /// What the listener is given: `redis+sentinel://…/el/0`.
    pub url: String,
    /// The replica's port: the master's once Sentinel promotes it.
    pub replica_port: u16,
    pub backend: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn redis_server(dir: &Path, args: &[String]) -> anyhow::Result<Child> {
    Command::new("redis-server")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start redis-server; {INSTALL}"))
}

async fn accepting(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn on_loopback(port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .map(str::to_owned)
    .to_vec()
}

impl SentinelSet {
    pub async fn start(dir: &Path) -> anyhow::Result<SentinelSet> {
        let dir = dir.join("sentinel");
        std::fs::create_dir_all(&dir)?;
        let (master_port, replica_port) = (free_port()?, free_port()?);
        let master = redis_server(&dir, &on_loopback(master_port))?;
        accepting(master_port).await?;
        let mut replica = on_loopback(replica_port);
        replica.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            master_port.to_string(),
        ]);
        let mut others = vec![redis_server(&dir, &replica)?];
        accepting(replica_port).await?;
        let mut sentinels = Vec::new();
        for n in 0..3 {
            let port = free_port()?;
            let config = dir.join(format!("sentinel-{n}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor el 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds el 1000\n\
                     sentinel failover-timeout el 4000\n",
                    dir.display()
                ),
            )?;
            others.push(redis_server(
                &dir,
                &[config.to_string_lossy().into_owned(), "--sentinel".into()],
            )?);
            accepting(port).await?;
            sentinels.push(format!("127.0.0.1:{port}"));
        }
        Ok(SentinelSet {
            master: Some(master),
            _others: others,
            url: format!("redis+sentinel://{}/el/0", sentinels.join(",")),
            replica_port,
            backend: format!(
                "Redis Sentinel (master :{master_port}, replica :{replica_port}, three sentinels)"
            ),
        })
    }

    /// `kill -9` of the master.
    pub async fn kill_master(&mut self) -> anyhow::Result<()> {
        let mut master = self
            .master
            .take()
            .context("the Redis master was killed already")?;
        master.kill().await?;
        Ok(())
    }
}
