//! Where the etcd API is served: a TCP address (`HOST:PORT`), or a Unix
//! socket (`unix://PATH`, kine's form, which k3s and Kamaji use). Either
//! carries TLS when it is configured (clients then say `unixs://PATH`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Binds `address`. A Unix socket is its owner's only, as kine's: it is
    /// bound in a private folder, restricted, then moved into place, so no
    /// one else can connect in between. A socket file left at the path by a
    /// router that did not stop cleanly is replaced; a socket something
    /// still serves on is not.
    pub async fn bind(address: &str) -> std::io::Result<(Bound, Listening)> {
        let Some(path) = address.strip_prefix("unix://") else {
            let listener = TcpListener::bind(address).await?;
            let local = listener.local_addr()?;
            return Ok((Bound::Tcp(listener), Listening::Tcp(local)));
        };
        let path = PathBuf::from(path);
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        remove_stale_socket(&path)?;
        let listener = bind_private(&path)?;
        Ok((Bound::Unix(listener), Listening::Unix(path)))
    }
}

/// Binds a socket at `path` that only its owner may use.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = parent.join(format!(".kubeshard-{}.tmp", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("socket");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Removes a socket file left at `path`; anything else there is an error
/// (it is not kubeshard's to delete).
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
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
