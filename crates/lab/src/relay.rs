//! The lab's private iroh relay: an `iroh-relay` server (HTTPS relaying
//! plus QUIC address discovery) with a certificate signed by a throw-away
//! CA, generated per run. The nodes trust it through their config
//! (`[iroh] relay_url`, `relay_ca_cert` = the PEM written here).
//!
//! The relay runs inside the lab process, on a thread that entered the
//! "public" namespace ([`crate::netns::Netns::spawn_task`]), so its
//! sockets live there; [`RelayHandle::stop`] ends it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use iroh_relay::server::{CertConfig, QuicConfig, RelayConfig, Server, ServerConfig, TlsConfig};

use crate::netns::Netns;

/// HTTPS port of the relay (the relay URL's port).
pub const HTTPS_PORT: u16 = 443;
/// Plain HTTP port (iroh's captive-portal probe).
pub const HTTP_PORT: u16 = 80;
/// UDP port of QUIC address discovery. iroh clients ask the relay's host
/// on this port (`iroh_relay::defaults::DEFAULT_RELAY_QUIC_PORT`) whatever
/// the relay URL says, so the relay must serve it here.
pub const QUIC_PORT: u16 = iroh_relay::defaults::DEFAULT_RELAY_QUIC_PORT;
/// File name of the CA certificate written for the nodes.
pub const CA_FILE: &str = "relay-ca.pem";

/// A CA and the relay's certificate it signed.
pub struct RelayCerts {
    /// The CA certificate, PEM (what `relay_ca_cert` names).
    pub ca_pem: String,
    /// The CA certificate, DER.
    pub ca_der: Vec<u8>,
    /// A TLS 1.2/1.3 server configuration presenting the relay's
    /// certificate.
    pub server: rustls::ServerConfig,
}

impl std::fmt::Debug for RelayCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCerts")
            .field("ca_der", &self.ca_der.len())
            .finish_non_exhaustive()
    }
}

/// Generates a CA and a certificate for `names` (IP addresses or DNS
/// names) signed by it.
pub fn generate_certs(names: &[String]) -> anyhow::Result<RelayCerts> {
    let ca_key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tern lab relay CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)
        .context("signing the CA certificate")?;
    let leaf_key = rcgen::KeyPair::generate().context("generating the relay key")?;
    let leaf = rcgen::CertificateParams::new(names.to_vec())
        .with_context(|| format!("relay certificate names {names:?}"))?
        .signed_by(&leaf_key, &ca)
        .context("signing the relay certificate")?;
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key.into())
    .context("the relay's TLS configuration")?;
    Ok(RelayCerts {
        ca_pem: ca.pem(),
        ca_der: ca.der().to_vec(),
        server,
    })
}

/// The relay URL for a relay at `ip`.
pub fn relay_url(ip: IpAddr) -> String {
    format!("https://{ip}:{HTTPS_PORT}")
}

/// A running relay; [`RelayHandle::stop`] ends it (dropping the handle
/// ends it too, when the lab's thread notices the closed channel).
#[derive(Debug)]
pub struct RelayHandle {
    /// The relay URL nodes use.
    pub url: String,
    /// The CA certificate file nodes trust.
    pub ca_file: PathBuf,
    /// The CA certificate, DER (for the lab's own endpoints).
    pub ca_der: Vec<u8>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<RelayStats>>>,
}

/// What the relay counted while it ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Relay client connections accepted.
    pub accepts: u64,
    /// Data packets the relay received from clients to forward.
    pub packets_relayed: u64,
    /// QUIC address discovery connections served.
    pub qad_connections: u64,
}

impl RelayHandle {
    /// Stops the relay and returns its counters.
    pub async fn stop(mut self) -> anyhow::Result<RelayStats> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(thread) = self.thread.take() else {
            return Ok(RelayStats::default());
        };
        tokio::task::spawn_blocking(move || {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the relay thread panicked"))?
        })
        .await?
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a relay in `ns` at `ip` (HTTPS on [`HTTPS_PORT`], HTTP on
/// [`HTTP_PORT`], QUIC address discovery on [`QUIC_PORT`]), with a fresh
/// CA whose certificate is written to `dir/`[`CA_FILE`]. Returns once it
/// listens.
pub async fn start(ns: &Netns, ip: IpAddr, dir: &Path) -> anyhow::Result<RelayHandle> {
    let certs = generate_certs(&[ip.to_string()])?;
    let ca_file = dir.join(CA_FILE);
    std::fs::write(&ca_file, &certs.ca_pem)
        .with_context(|| format!("writing {}", ca_file.display()))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let tls = certs.server.clone();
    let thread = ns.spawn_task(move || async move {
        let mut relay = RelayConfig::new(SocketAddr::new(ip, HTTP_PORT));
        relay.tls = Some(TlsConfig::new(
            SocketAddr::new(ip, HTTPS_PORT),
            CertConfig::Manual {
                server_config: tls.clone(),
            },
        ));
        let mut quic = QuicConfig::new(SocketAddr::new(ip, QUIC_PORT));
        quic.server_config = Some(tls);
        let mut config = ServerConfig::default();
        config.relay = Some(relay);
        config.quic = Some(quic);
        let server = match Server::spawn(config).await {
            Ok(s) => s,
            Err(e) => {
                let e = anyhow::anyhow!("starting the relay at {ip}: {e}");
                let _ = ready_tx.send(Err(anyhow::anyhow!("{e}")));
                return Err(e);
            }
        };
        let _ = ready_tx.send(Ok(()));
        // Runs until stopped or the handle is dropped.
        let _ = stop_rx.await;
        let m = &server.metrics().server;
        let stats = RelayStats {
            accepts: m.accepts.get(),
            packets_relayed: m.send_packets_recv.get(),
            qad_connections: m.qad_connections.get(),
        };
        if let Err(e) = server.shutdown().await {
            tracing::warn!("relay shutdown: {e}");
        }
        Ok(stats)
    })?;
    ready_rx
        .await
        .context("the relay thread ended before it listened")??;
    Ok(RelayHandle {
        url: relay_url(ip),
        ca_file,
        ca_der: certs.ca_der,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_name_the_relay_and_chain_to_the_ca() {
        let certs = generate_certs(&["10.0.0.1".to_owned()]).unwrap();
        assert!(certs.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!certs.ca_der.is_empty());
        assert_eq!(
            relay_url("10.0.0.1".parse().unwrap()),
            "https://10.0.0.1:443"
        );
    }
}
