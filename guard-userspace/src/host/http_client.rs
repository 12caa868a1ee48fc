//! The agent's outbound HTTP(S) requests: the alert webhook's POSTs and the CrowdSec
//! bouncer's polls. One request per connection over hyper's HTTP/1.1 (both talk to a peer a
//! few times a minute at most, so a pool would buy nothing); an `https` URL verifies the
//! peer's certificate against the system's roots.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use http_body_util::Full;
use hyper::{Request, Response, Uri, body::Bytes, body::Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where requests go: an `http://` or `https://` URL with a host.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub uri: Uri,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: bool,
}

impl Endpoint {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("{url:?}: only http:// and https:// URLs are supported"),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .with_context(|| format!("{url:?} names no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Endpoint { uri, host, port, tls })
    }

    /// TLS for this endpoint, if it is `https`.
    pub fn tls_connector(&self) -> anyhow::Result<Option<tokio_rustls::TlsConnector>> {
        if self.tls { tls_connector(&self.uri).map(Some) } else { Ok(None) }
    }

    /// `path_and_query` on this endpoint's host, as a request builder with the headers every
    /// request carries.
    pub fn request(
        &self,
        method: hyper::Method,
        path_and_query: &str,
    ) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, self.uri.authority().map_or("", |a| a.as_str()))
            .header(
                hyper::header::USER_AGENT,
                concat!("container-guard/", env!("CARGO_PKG_VERSION")),
            )
    }
}

/// Connects to `endpoint` (with TLS if `tls` is given) and sends `request` on a fresh
/// connection; the response's body is still to be read.
pub async fn send(
    endpoint: &Endpoint,
    tls: Option<&tokio_rustls::TlsConnector>,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<Response<Incoming>> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .with_context(|| format!("connecting to {}:{}", endpoint.host, endpoint.port))?;
    match tls {
        Some(tls) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                .with_context(|| {
                    format!("{} is not a name a certificate can carry", endpoint.host)
                })?;
            let stream = tls.connect(name, tcp).await.context("TLS handshake")?;
            exchange(TokioIo::new(stream), request).await
        }
        None => exchange(TokioIo::new(tcp), request).await,
    }
}

async fn exchange<T>(io: T, request: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    Ok(sender.send_request(request).await?)
}

/// TLS that verifies the peer's certificate against the system's trust store.
fn tls_connector(uri: &Uri) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        bail!(
            "{uri} is https, but no trusted root certificate was found on this system ({:?})",
            found.errors
        );
    }
    // ring, not aws-lc-rs: no C build beyond cc. Its lack of post-quantum key exchange (why
    // rustls deprecates its default provider) matters little for alerts that say what is
    // already visible from the network, or for ban lists that are no secret either.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_or_https_with_a_host() {
        let t = Endpoint::parse("http://127.0.0.1:8099/hook").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("127.0.0.1", 8099, false));
        let t = Endpoint::parse("https://alerts.example/x?y=1").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("alerts.example", 443, true));
        let t = Endpoint::parse("http://[::1]:9/").unwrap();
        assert_eq!(t.host, "::1");
        for bad in ["ftp://x/", "/just/a/path", "http://", "not a url"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
