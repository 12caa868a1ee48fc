//! The engine's own doors as the host shows them (README, "What it protects"): its
//! swarm through the API ([`DockerClient::swarm`]), and the tcp sockets its process listens
//! on. The API does not say where it listens (`-H tcp://…` is a command-line flag, and a
//! daemon.json `hosts` entry is not visible either), so the listeners are found as the kernel
//! knows them: the engine's process is the peer of the unix socket the agent talks to, and its
//! sockets are listed over sock_diag.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    host::docker::{DockerClient, DockerError},
    host::sock_diag,
    policy::snapshot::{ApiListener, EngineDoors, GOSSIP_PORT},
};

/// Docker's default socket, where DOCKER_HOST names none.
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// How long a listener may take to answer the plain-text probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Finds the engine's doors; remembers which listeners answered plain HTTP, so that each is
/// probed once, not on every pass.
#[derive(Default)]
pub struct EngineDoorsWatch {
    plain_text: BTreeMap<SocketAddr, bool>,
}

impl EngineDoorsWatch {
    pub async fn doors(&mut self, docker: &DockerClient) -> Result<EngineDoors, DockerError> {
        let swarm = docker.swarm().await?;
        // In a swarm the engine itself listens on the control and gossip ports too.
        let swarm_ports: Vec<u16> =
            swarm.iter().flat_map(|s| s.control_port.into_iter().chain([GOSSIP_PORT])).collect();
        let mut api = Vec::new();
        for addr in engine_listeners().into_iter().filter(|a| !swarm_ports.contains(&a.port())) {
            let plain_text = match self.plain_text.get(&addr) {
                Some(known) => *known,
                None => {
                    let answer = answers_plain_http(addr).await;
                    self.plain_text.insert(addr, answer);
                    answer
                }
            };
            api.push(ApiListener { addr, plain_text });
        }
        api.sort();
        Ok(EngineDoors { swarm, api })
    }
}

/// The unix socket the agent reaches the engine through: DOCKER_HOST's, or Docker's default.
/// None when DOCKER_HOST names no unix socket (the engine is then not a process of this host
/// the agent can find).
fn engine_socket() -> Option<PathBuf> {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => host.strip_prefix("unix://").map(PathBuf::from),
        _ => Some(PathBuf::from(DEFAULT_SOCKET)),
    }
}

/// The tcp sockets the engine's process listens on: its API on tcp (the engine listens on no
/// other tcp port of its own; docker-proxy, which relays published ports, is another process).
/// Empty when the engine cannot be found: nothing is guarded that is not known to be there.
fn engine_listeners() -> Vec<SocketAddr> {
    let Some(pid) = engine_socket().and_then(|path| engine_pid(&path)) else {
        return Vec::new();
    };
    sock_diag::tcp_listeners_of(pid).unwrap_or_default()
}

/// The process on the other end of the engine's unix socket.
fn engine_pid(socket: &std::path::Path) -> Option<u32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let stream = UnixStream::connect(socket).ok()?;
    let credentials = getsockopt(&stream, PeerCredentials).ok()?;
    u32::try_from(credentials.pid()).ok().filter(|pid| *pid > 0)
}

/// Whether the listener answers a plain HTTP request: no TLS, so nothing but the network
/// stands between whoever reaches it and root on the host. Asked over loopback where it
/// listens on a wildcard address.
async fn answers_plain_http(listener: SocketAddr) -> bool {
    let ip = match listener.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let probe = async {
        let mut stream =
            tokio::net::TcpStream::connect(SocketAddr::new(ip, listener.port())).await?;
        stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n").await?;
        let mut start = [0u8; 5];
        stream.read_exact(&mut start).await?;
        Ok::<bool, std::io::Error>(&start == b"HTTP/")
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_plain_http_listener_is_told_from_one_that_answers_otherwise() {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls_like = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http_addr, tls_addr) = (http.local_addr().unwrap(), tls_like.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = http.accept().await.unwrap();
            let mut request = [0u8; 16];
            let _ = s.read(&mut request).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nOK").await;
        });
        tokio::spawn(async move {
            let (mut s, _) = tls_like.accept().await.unwrap();
            // A TLS server answers a plain request with an alert record.
            let _ = s.write_all(&[0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46]).await;
        });
        assert!(answers_plain_http(http_addr).await);
        assert!(!answers_plain_http(tls_addr).await);
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(!answers_plain_http(closed).await, "nothing listens: not plain text");
    }
}
