//! A TCP proxy that can freeze: in front of a database, it makes the
//! database hang the way a frozen host or a black-holed network path does.
//! Frozen, it accepts connections and keeps every one open, but moves no
//! byte in either direction (a chunk read just before the freeze is held
//! until the thaw, as a network buffer would). Thawed, it forwards again,
//! including what each side sent or closed meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy saw, for tests to reason about connections.
#[derive(Debug, Default)]
pub struct ProxyCounts {
    /// Connections accepted from clients.
    pub accepted: AtomicU64,
    /// Connections whose client closed its side (EOF or reset).
    pub closed_by_client: AtomicU64,
}

#[derive(Debug)]
pub struct FreezingProxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    counts: Arc<ProxyCounts>,
    task: JoinHandle<()>,
}

impl FreezingProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FreezingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (frozen, _) = watch::channel(false);
        let counts = Arc::new(ProxyCounts::default());
        let task = tokio::spawn(accept(
            listener,
            upstream,
            frozen.subscribe(),
            counts.clone(),
        ));
        Ok(FreezingProxy {
            addr,
            frozen,
            counts,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn counts(&self) -> &ProxyCounts {
        &self.counts
    }

    /// From now on no byte moves and new connections are held.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    frozen: watch::Receiver<bool>,
    counts: Arc<ProxyCounts>,
) {
    // Connection tasks end with their sockets; they are not tracked.
    while let Ok((client, _)) = listener.accept().await {
        counts.accepted.fetch_add(1, Ordering::Relaxed);
        let frozen = frozen.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut thawed = frozen.clone();
            if thawed.wait_for(|f| !*f).await.is_err() {
                return;
            }
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(client_read, server_write, frozen.clone());
            let down = pump(server_read, client_write, frozen);
            let (client_closed, _) = tokio::join!(up, down);
            if client_closed {
                counts.closed_by_client.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Copies `from` to `to`, never while frozen. True when `from` ended (EOF
/// or error), false when writing to `to` failed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return false;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // The end is news too: it waits for the thaw like data.
                let _ = frozen.wait_for(|f| !*f).await;
                let _ = to.shutdown().await;
                return true;
            }
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            return false;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
    }
}
