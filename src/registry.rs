//! The lease store: a small trait the daemon is written against, and its
//! etcd v3 implementation. Only this module knows about etcd.

use crate::subnet::{lease_key, subnets_prefix};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use ipnetwork::Ipv4Network;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// A lease key/value as stored, not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLease {
    pub key: String,
    pub value: Vec<u8>,
    /// etcd lease id; 0 for a reservation.
    pub lease_id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(RawLease),
    Delete(String),
    /// `<prefix>/config` was written (its new text) or deleted (`None`).
    Config(Option<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// Events (possibly none of ours) up to and including store `revision`:
    /// a watch resumed from `revision + 1` misses nothing.
    Events {
        events: Vec<WatchEvent>,
        revision: i64,
    },
    /// The revision the watch started from is gone (compacted, or the
    /// store's history went backwards, e.g. restored from a backup): re-list.
    Compacted,
}

pub type StoreError = anyhow::Error;

/// What the daemon needs from a lease store (flannel's `Registry`).
pub trait LeaseStore: Send + Sync + 'static {
    type Watch: LeaseWatch;
    /// `<prefix>/config`, or `None` when the key is absent.
    fn get_config(&self) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// All leases and the store revision they were read at.
    fn list(&self) -> impl Future<Output = Result<(Vec<RawLease>, i64), StoreError>> + Send;
    /// Creates the lease only if its key is absent. `None`: someone else has it.
    fn create(
        &self,
        subnet: Ipv4Network,
        value: String,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Duration>, StoreError>> + Send;
    /// Writes the lease with a fresh TTL (or none: a reservation); returns its lifetime.
    fn put(
        &self,
        subnet: Ipv4Network,
        value: String,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Option<Duration>, StoreError>> + Send;
    fn delete(&self, subnet: Ipv4Network) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Watches all leases and the network config from `revision` on (inclusive).
    fn watch(&self, revision: i64) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;
}

pub trait LeaseWatch: Send + 'static {
    fn next(&mut self) -> impl Future<Output = Result<WatchItem, StoreError>> + Send;
}

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Fails when the (first) certificate in a PEM file is expired or not yet
/// valid: etcd would just drop the TLS connection, which looks like an
/// outage from here, so say it before connecting.
fn check_certificate_dates(pem: &[u8], path: &std::path::Path) -> anyhow::Result<()> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| {
        anyhow::anyhow!(
            "--etcd-certfile {} is not a PEM certificate: {e}",
            path.display()
        )
    })?;
    let cert = pem.parse_x509().map_err(|e| {
        anyhow::anyhow!(
            "--etcd-certfile {} is not an X.509 certificate: {e}",
            path.display()
        )
    })?;
    let v = cert.validity();
    if !v.is_valid() {
        anyhow::bail!(
            "client certificate --etcd-certfile {} is not valid now: valid from {} to {}",
            path.display(),
            v.not_before,
            v.not_after
        );
    }
    Ok(())
}

/// Whether an etcd error is one that retrying cannot fix: TLS trust,
/// certificates, authentication, permissions.
pub fn is_permanent(e: &StoreError) -> bool {
    if let Some(etcd_client::Error::GRpcStatus(st)) = e.downcast_ref::<etcd_client::Error>() {
        use tonic::Code;
        if matches!(st.code(), Code::Unauthenticated | Code::PermissionDenied) {
            return true;
        }
    }
    let text = format!("{e:#}").to_lowercase();
    [
        "invalid peer certificate",
        "certificate verify",
        "unknownissuer",
        "authentication failed",
        "permission denied",
        "user name is empty",
        "invalid auth token",
    ]
    .iter()
    .any(|k| text.contains(k))
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

impl EtcdStore {
    pub async fn connect(o: &EtcdOptions) -> Result<Self, StoreError> {
        use anyhow::Context;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let (Some(u), Some(p)) = (&o.username, &o.password) {
            opts = opts.with_user(u.clone(), p.clone());
        }
        if o.cafile.is_some() || o.certfile.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &o.cafile {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("reading --etcd-cafile {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&o.certfile, &o.keyfile) {
                (Some(c), Some(k)) => {
                    let cert = std::fs::read(c)
                        .with_context(|| format!("reading --etcd-certfile {}", c.display()))?;
                    check_certificate_dates(&cert, c)?;
                    let key = std::fs::read(k)
                        .with_context(|| format!("reading --etcd-keyfile {}", k.display()))?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => anyhow::bail!("--etcd-certfile and --etcd-keyfile must be given together"),
            }
            opts = opts.with_tls(tls);
        }
        let client = Client::connect(&o.endpoints, Some(opts))
            .await
            .with_context(|| format!("connecting to etcd at {}", o.endpoints.join(",")))?;
        Ok(EtcdStore {
            client,
            prefix: o.prefix.trim_end_matches('/').to_string(),
        })
    }

    async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), StoreError> {
        let r = self
            .client
            .clone()
            .lease_grant(ttl.as_secs().max(1) as i64, None)
            .await?;
        Ok((r.id(), Duration::from_secs(r.ttl().max(0) as u64)))
    }
}

impl LeaseStore for EtcdStore {
    type Watch = EtcdWatch;

    async fn get_config(&self) -> Result<Option<String>, StoreError> {
        let key = format!("{}/config", self.prefix);
        let r = self.client.clone().get(key, None).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn list(&self) -> Result<(Vec<RawLease>, i64), StoreError> {
        let r = self
            .client
            .clone()
            .get(
                subnets_prefix(&self.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        let leases = r
            .kvs()
            .iter()
            .map(|kv| RawLease {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                lease_id: kv.lease(),
            })
            .collect();
        Ok((leases, rev))
    }

    async fn create(
        &self,
        subnet: Ipv4Network,
        value: String,
        ttl: Duration,
    ) -> Result<Option<Duration>, StoreError> {
        let key = lease_key(&self.prefix, subnet);
        let (id, granted) = self.grant(ttl).await?;
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(id)),
            )]);
        let r = self.client.clone().txn(txn).await?;
        if r.succeeded() {
            Ok(Some(granted))
        } else {
            let _ = self.client.clone().lease_revoke(id).await;
            Ok(None)
        }
    }

    async fn put(
        &self,
        subnet: Ipv4Network,
        value: String,
        ttl: Option<Duration>,
    ) -> Result<Option<Duration>, StoreError> {
        let key = lease_key(&self.prefix, subnet);
        match ttl {
            None => {
                self.client.clone().put(key, value, None).await?;
                Ok(None)
            }
            Some(ttl) => {
                let (id, granted) = self.grant(ttl).await?;
                self.client
                    .clone()
                    .put(key, value, Some(PutOptions::new().with_lease(id)))
                    .await?;
                Ok(Some(granted))
            }
        }
    }

    async fn delete(&self, subnet: Ipv4Network) -> Result<(), StoreError> {
        self.client
            .clone()
            .delete(lease_key(&self.prefix, subnet), None)
            .await?;
        Ok(())
    }

    async fn watch(&self, revision: i64) -> Result<EtcdWatch, StoreError> {
        // The whole prefix: leases and the config key in one stream.
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let stream = self
            .client
            .clone()
            .watch(format!("{}/", self.prefix), Some(opts))
            .await?;
        Ok(EtcdWatch {
            stream,
            start: revision,
            checked_start: false,
            config_key: format!("{}/config", self.prefix),
            subnets: subnets_prefix(&self.prefix),
        })
    }
}

pub struct EtcdWatch {
    stream: etcd_client::WatchStream,
    /// The revision the watch was asked to start from.
    start: i64,
    /// Whether the first response's header was checked against `start`.
    checked_start: bool,
    config_key: String,
    subnets: String,
}

impl LeaseWatch for EtcdWatch {
    async fn next(&mut self) -> Result<WatchItem, StoreError> {
        loop {
            let Some(resp) = self.stream.message().await? else {
                anyhow::bail!("etcd closed the watch stream");
            };
            if resp.compact_revision() > 0 {
                return Ok(WatchItem::Compacted);
            }
            if !self.checked_start {
                self.checked_start = true;
                // A resumed watch on a store whose history is shorter than
                // what we saw (a new or restored cluster) would wait for
                // revisions that mean something else now.
                let now = resp.header().map_or(i64::MAX, |h| h.revision());
                if now < self.start - 1 {
                    return Ok(WatchItem::Compacted);
                }
            }
            if resp.canceled() {
                anyhow::bail!("etcd cancelled the watch: {}", resp.cancel_reason());
            }
            if resp.events().is_empty() {
                continue; // created / progress notifications
            }
            let revision = resp
                .events()
                .iter()
                .filter_map(|ev| ev.kv().map(|kv| kv.mod_revision()))
                .max()
                .unwrap_or(0);
            let events = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    if key == self.config_key {
                        return Some(WatchEvent::Config(match ev.event_type() {
                            EventType::Put => {
                                Some(String::from_utf8_lossy(kv.value()).into_owned())
                            }
                            EventType::Delete => None,
                        }));
                    }
                    if !key.starts_with(&self.subnets) {
                        return None; // other keys under the prefix are not ours
                    }
                    Some(match ev.event_type() {
                        EventType::Put => WatchEvent::Put(RawLease {
                            key,
                            value: kv.value().to_vec(),
                            lease_id: kv.lease(),
                        }),
                        EventType::Delete => WatchEvent::Delete(key),
                    })
                })
                .collect();
            return Ok(WatchItem::Events { events, revision });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc(code: tonic::Code, msg: &str) -> StoreError {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg)).into()
    }

    #[test]
    fn credentials_and_trust_errors_are_permanent_outages_are_not() {
        // Permanent: retrying cannot fix these; the operator must.
        assert!(is_permanent(&grpc(
            tonic::Code::Unauthenticated,
            "invalid auth token"
        )));
        assert!(is_permanent(&grpc(
            tonic::Code::PermissionDenied,
            "permission denied"
        )));
        for text in [
            "transport error: invalid peer certificate: UnknownIssuer",
            "tls handshake: certificate verify failed",
            "etcdserver: authentication failed, invalid user ID or password",
            "etcdserver: user name is empty",
        ] {
            assert!(is_permanent(&anyhow::anyhow!("{text}")), "{text}");
        }
        // Wrapped in context, as the daemon's errors are.
        let e =
            anyhow::anyhow!("invalid peer certificate: UnknownIssuer").context("listing leases");
        assert!(is_permanent(&e));
        // Transient: etcd away, restarting, slow, or a leader election.
        assert!(!is_permanent(&grpc(
            tonic::Code::Unavailable,
            "connection refused"
        )));
        assert!(!is_permanent(&grpc(
            tonic::Code::DeadlineExceeded,
            "context deadline exceeded"
        )));
        assert!(!is_permanent(&grpc(
            tonic::Code::Unknown,
            "etcdserver: leader changed"
        )));
        for text in [
            "transport error: Connection refused (os error 111)",
            "etcd closed the watch stream",
            "decoded message length too large",
        ] {
            assert!(!is_permanent(&anyhow::anyhow!("{text}")), "{text}");
        }
    }
}
