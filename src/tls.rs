//! TLS for every cloud connection: rustls with the ring provider (boringtun already brings
//! ring, so there is one crypto library) and the Mozilla roots embedded through
//! `webpki-roots`, because a bare appliance has no `/etc/ssl`.

use std::sync::{Arc, OnceLock};

/// Installs ring as rustls' process-wide crypto provider. Idempotent; call before any TLS.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The shared client config: embedded webpki roots, TLS 1.2 and 1.3, ALPN unset.
pub(crate) fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            install_crypto_provider();
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            Arc::new(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        })
        .clone()
}

/// A `tokio-tungstenite` connector using [`client_config`].
pub(crate) fn websocket_connector() -> tokio_tungstenite::Connector {
    tokio_tungstenite::Connector::Rustls(client_config())
}

/// A `reqwest` client builder preconfigured with [`client_config`] (HTTP/1.1 and HTTP/2).
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let mut config = (*client_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder().tls_backend_preconfigured(config)
}

#[cfg(test)]
mod tests {
    #[test]
    fn builds_clients_without_system_roots() {
        assert!(
            !super::client_config()
                .crypto_provider()
                .cipher_suites
                .is_empty()
        );
        super::http_client_builder()
            .build()
            .expect("reqwest client with embedded roots");
    }
}
