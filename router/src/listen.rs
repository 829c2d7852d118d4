//! Where the etcd API is served: a TCP address (`HOST:PORT`), or a Unix
//! socket (`unix://PATH`, kine's form, which k3s and Kamaji use). Either
//! carries TLS when it is configured (clients then say `unixs://PATH`).

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};

/// A bound listener.
#[derive(Debug)]
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// What a listener is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listening {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listening {
    /// The URL etcd clients use (MemberList's client URLs).
    pub fn url(&self, tls: bool) -> String {
        match (self, tls) {
            (Listening::Tcp(addr), false) => format!("http://{addr}"),
            (Listening::Tcp(addr), true) => format!("https://{addr}"),
            (Listening::Unix(path), false) => format!("unix://{}", path.display()),
            (Listening::Unix(path), true) => format!("unixs://{}", path.display()),
        }
    }
}

impl Bound {
    /// Binds `address`. A Unix socket replaces a stale socket file at its
    /// path (a router that did not stop cleanly) and is made accessible to
    /// its owner only, as kine does.
    pub async fn bind(address: &str) -> std::io::Result<(Bound, Listening)> {
        let Some(path) = address.strip_prefix("unix://") else {
            let listener = TcpListener::bind(address).await?;
            let local = listener.local_addr()?;
            return Ok((Bound::Tcp(listener), Listening::Tcp(local)));
        };
        let path = PathBuf::from(path);
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok((Bound::Unix(listener), Listening::Unix(path)))
    }
}

/// Removes a socket file left at `path`; anything else there is an error
/// (it is not kubeshard's to delete).
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the socket of a stopped router (best effort).
pub fn remove_socket(listening: &Listening) {
    if let Listening::Unix(path) = listening {
        let _ = remove_stale_socket(path);
    }
}
