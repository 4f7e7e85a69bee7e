//! Redis behind Sentinel for a scenario: a master, one replica of it, and three sentinels
//! watching it as `el` (down after 1 s), each a `redis-server` process on a loopback port that
//! the harness owns. The master can be killed; Sentinel then promotes the replica.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use tokio::process::{Child, Command};

use crate::redis::{free_port, spawn, spawn_server, wait_ready};

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

impl SentinelSet {
    pub async fn start(dir: &Path) -> anyhow::Result<SentinelSet> {
        let dir = dir.join("sentinel");
        std::fs::create_dir_all(&dir)?;
        let (master_port, replica_port) = (free_port()?, free_port()?);
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let master = spawn_server(master_port, &dir, &[])?;
        wait_ready(local(master_port)).await?;
        let replica_of = [
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master_port.to_string(),
        ];
        let mut others = vec![spawn_server(replica_port, &dir, &replica_of)?];
        wait_ready(local(replica_port)).await?;
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
            // The configuration file comes first; Sentinel rewrites it as it learns.
            others.push(spawn(
                Command::new("redis-server")
                    .arg(&config)
                    .arg("--sentinel")
                    .current_dir(&dir),
            )?);
            wait_ready(local(port)).await?;
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
