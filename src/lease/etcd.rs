//! The etcd v3 adapter of [`LeaseStore`]: the only module that knows about
//! etcd. Lists are paged, writes and deletes are transactions under their
//! [`Expect`] condition, and every etcd error becomes a typed
//! [`StoreError`] (transient or permanent).

use super::store::{
    Expect, LeaseStore, LeaseWatch, RawLease, StoreError, WatchEvent, WatchItem, Written,
};
use crate::subnet::{lease_key, subnets_prefix};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp, WatchOptions,
};
use ipnetwork::Ipv4Network;
use std::path::PathBuf;
use std::time::Duration;

/// Keys per page of a lease list; halved while a page is too large for
/// the client (etcd values may be 1.5 MiB each).
const PAGE: i64 = 500;
/// Largest reply we accept: one page, or one watch response.
const MAX_REPLY: usize = 64 << 20;
/// How long one etcd call may take before it counts as an outage (a
/// stopped etcd accepts connections and never answers).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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
            "--etcd-certfile (FLANNELD_ETCD_CERTFILE) {} is not a PEM certificate: {e}",
            path.display()
        )
    })?;
    let cert = pem.parse_x509().map_err(|e| {
        anyhow::anyhow!(
            "--etcd-certfile (FLANNELD_ETCD_CERTFILE) {} is not an X.509 certificate: {e}",
            path.display()
        )
    })?;
    let v = cert.validity();
    if !v.is_valid() {
        anyhow::bail!(
            "client certificate --etcd-certfile (FLANNELD_ETCD_CERTFILE) {} is not valid now: valid from {} to {}",
            path.display(),
            v.not_before,
            v.not_after
        );
    }
    Ok(())
}

/// Whether an error text is one that retrying cannot fix: TLS trust,
/// certificates, authentication, permissions.
fn permanent_text(text: &str) -> bool {
    let text = text.to_lowercase();
    [
        "invalid peer certificate",
        "certificate verify",
        "unknownissuer",
        "authentication failed",
        "permission denied",
        "user name is empty",
    ]
    .iter()
    .any(|k| text.contains(k))
}

/// An etcd client error as a [`StoreError`].
pub fn classify(e: etcd_client::Error) -> StoreError {
    let text = e.to_string();
    let permanent = match &e {
        etcd_client::Error::GRpcStatus(st) => {
            // An expired token is not a wrong password: the client
            // authenticates again (see `connect`), so retrying fixes it.
            !st.message().contains("invalid auth token")
                && (matches!(
                    st.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) || permanent_text(&text))
        }
        _ => permanent_text(&text),
    };
    if permanent {
        StoreError::Permanent(text)
    } else {
        StoreError::Transient(text)
    }
}

/// Runs one etcd call with a deadline, its error classified.
async fn call<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(classify),
        Err(_) => Err(StoreError::Transient(format!(
            "etcd did not answer within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// The etcd store. The connection is made on first use, not at start: a
/// connection with a username authenticates at once, and flanneld must
/// start (from its peer cache) while etcd is down.
#[derive(Clone)]
pub struct EtcdStore {
    conn: std::sync::Arc<Connector>,
    prefix: String,
}

struct Connector {
    endpoints: Vec<String>,
    opts: ConnectOptions,
    client: tokio::sync::OnceCell<Client>,
}

impl EtcdStore {
    pub async fn connect(o: &EtcdOptions) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let (Some(u), Some(p)) = (&o.username, &o.password) {
            // etcd's auth tokens expire (`--auth-token-ttl`, 300 s by
            // default): a call refused with "invalid auth token" then
            // authenticates again and is retried once, by the client.
            opts = opts
                .with_user(u.clone(), p.clone())
                .with_auto_token_refresh(true);
        }
        // A key file alone is a half-given client identity, refused below
        // (never a silent fall-back to plaintext).
        if o.cafile.is_some() || o.certfile.is_some() || o.keyfile.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &o.cafile {
                let pem = std::fs::read(ca).with_context(|| {
                    format!(
                        "reading --etcd-cafile (FLANNELD_ETCD_CAFILE) {}",
                        ca.display()
                    )
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&o.certfile, &o.keyfile) {
                (Some(c), Some(k)) => {
                    let cert = std::fs::read(c).with_context(|| {
                        format!(
                            "reading --etcd-certfile (FLANNELD_ETCD_CERTFILE) {}",
                            c.display()
                        )
                    })?;
                    check_certificate_dates(&cert, c)?;
                    let key = std::fs::read(k).with_context(|| {
                        format!(
                            "reading --etcd-keyfile (FLANNELD_ETCD_KEYFILE) {}",
                            k.display()
                        )
                    })?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => anyhow::bail!("--etcd-certfile and --etcd-keyfile must be given together"),
            }
            opts = opts.with_tls(tls);
        }
        Ok(EtcdStore {
            conn: std::sync::Arc::new(Connector {
                endpoints: o.endpoints.clone(),
                opts,
                client: tokio::sync::OnceCell::new(),
            }),
            prefix: o.prefix.trim_end_matches('/').to_string(),
        })
    }

    /// The client, connecting (and authenticating) on first use; a failed
    /// connection is an error of the call, tried again by the next one.
    async fn client(&self) -> Result<Client, StoreError> {
        let c = &self.conn;
        c.client
            .get_or_try_init(|| async {
                match tokio::time::timeout(
                    CALL_TIMEOUT,
                    Client::connect(&c.endpoints, Some(c.opts.clone())),
                )
                .await
                {
                    Ok(r) => r.map_err(|e| match classify(e) {
                        StoreError::Transient(t) => StoreError::Transient(format!(
                            "connecting to etcd at {}: {t}",
                            c.endpoints.join(",")
                        )),
                        StoreError::Permanent(t) => StoreError::Permanent(format!(
                            "connecting to etcd at {}: {t}",
                            c.endpoints.join(",")
                        )),
                    }),
                    Err(_) => Err(StoreError::Transient(format!(
                        "connecting to etcd at {}: no answer within {} s",
                        c.endpoints.join(","),
                        CALL_TIMEOUT.as_secs()
                    ))),
                }
            })
            .await
            .cloned()
    }

    async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), StoreError> {
        let r = call(
            self.client()
                .await?
                .lease_grant(ttl.as_secs().max(1) as i64, None),
        )
        .await?;
        Ok((r.id(), Duration::from_secs(r.ttl().max(0) as u64)))
    }

    /// One page of keys from `from` (inclusive) to the end of `prefix`, read
    /// at `revision` (0: now).
    async fn page(
        &self,
        from: &[u8],
        end: &[u8],
        revision: i64,
        limit: i64,
        client: &Client,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let mut opts = GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(limit)
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        client
            .kv_client()
            .max_decoding_message_size(MAX_REPLY)
            .get(from.to_vec(), Some(opts))
            .await
    }
}

/// A transaction's compare for [`Expect`].
fn condition(key: &str, expect: Expect) -> Compare {
    match expect {
        Expect::Absent => Compare::version(key, CompareOp::Equal, 0),
        Expect::Revision(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
    }
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl LeaseStore for EtcdStore {
    type Watch = EtcdWatch;

    async fn get_config(&self) -> Result<Option<String>, StoreError> {
        let key = format!("{}/config", self.prefix);
        let r = call(self.client().await?.get(key, None)).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Pages through the subnets prefix at one revision, so a list of any
    /// size (junk included) neither exceeds the client's reply limit nor
    /// mixes two points in time.
    async fn list(&self) -> Result<(Vec<RawLease>, i64), StoreError> {
        let prefix = subnets_prefix(&self.prefix).into_bytes();
        let end = prefix_end(&prefix);
        let mut from = prefix.clone();
        let mut revision = 0;
        let mut limit = PAGE;
        let mut leases = Vec::new();
        let client = self.client().await?;
        loop {
            let r = match tokio::time::timeout(
                CALL_TIMEOUT,
                self.page(&from, &end, revision, limit, &client),
            )
            .await
            {
                Err(_) => {
                    return Err(StoreError::Transient(format!(
                        "etcd did not answer a list within {} s",
                        CALL_TIMEOUT.as_secs()
                    )))
                }
                Ok(Err(etcd_client::Error::GRpcStatus(st)))
                    if limit > 1
                        && (st.code() == tonic::Code::OutOfRange
                            || st.message().contains("message length too large")) =>
                {
                    limit = (limit / 2).max(1);
                    continue;
                }
                Ok(Err(e)) => return Err(classify(e)),
                Ok(Ok(r)) => r,
            };
            if revision == 0 {
                revision = r.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in r.kvs() {
                leases.push(RawLease {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: kv.value().to_vec(),
                    lease_id: kv.lease(),
                    mod_revision: kv.mod_revision(),
                });
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((leases, revision))
    }

    async fn write(
        &self,
        subnet: Ipv4Network,
        value: String,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<Option<Written>, StoreError> {
        let key = lease_key(&self.prefix, subnet);
        let (opts, granted) = match ttl {
            Some(ttl) => {
                let (id, granted) = self.grant(ttl).await?;
                (Some(PutOptions::new().with_lease(id)), Some((id, granted)))
            }
            None => (None, None),
        };
        let compare = condition(&key, expect);
        let key_of_txn = key.clone();
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, opts)]);
        let client = self.client().await?;
        let r = match call(client.clone().txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                // The granted etcd lease must not leak (one per retry,
                // each living a day): revoke it unless the write did
                // commit with its reply lost, which the key shows.
                if let Some((id, _)) = granted {
                    if let Ok(g) = call(client.clone().get(key_of_txn.clone(), None)).await {
                        if g.kvs().first().is_none_or(|kv| kv.lease() != id) {
                            let _ = call(client.clone().lease_revoke(id)).await;
                        }
                    }
                }
                return Err(e);
            }
        };
        if r.succeeded() {
            Ok(Some(Written {
                expires_in: granted.map(|(_, d)| d),
                revision: r.header().map(|h| h.revision()).unwrap_or(0),
            }))
        } else {
            if let Some((id, _)) = granted {
                let _ = call(client.clone().lease_revoke(id)).await;
            }
            Ok(None)
        }
    }

    async fn delete(&self, subnet: Ipv4Network, expect: Expect) -> Result<bool, StoreError> {
        let key = lease_key(&self.prefix, subnet);
        let compare = condition(&key, expect);
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::delete(key, None)]);
        Ok(call(self.client().await?.txn(txn)).await?.succeeded())
    }

    async fn watch(&self, revision: i64) -> Result<EtcdWatch, StoreError> {
        // The whole prefix: leases and the config key in one stream.
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let stream = call(
            self.client()
                .await?
                .watch_client()
                .max_decoding_message_size(MAX_REPLY)
                .watch(format!("{}/", self.prefix), Some(opts)),
        )
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
            let Some(resp) = self.stream.message().await.map_err(classify)? else {
                return Err(StoreError::Transient("etcd closed the watch stream".into()));
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
                return Err(StoreError::Transient(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                )));
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
                            mod_revision: kv.mod_revision(),
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

    fn grpc(code: tonic::Code, msg: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg))
    }

    #[test]
    fn credentials_and_trust_errors_are_permanent_outages_are_not() {
        // Permanent: retrying cannot fix these; the operator must.
        for (code, msg) in [
            (tonic::Code::PermissionDenied, "permission denied"),
            (
                tonic::Code::Unknown,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            (
                tonic::Code::InvalidArgument,
                "etcdserver: user name is empty",
            ),
        ] {
            assert!(classify(grpc(code, msg)).is_permanent(), "{msg}");
        }
        for text in [
            "transport error: invalid peer certificate: UnknownIssuer",
            "tls handshake: certificate verify failed",
        ] {
            assert!(permanent_text(text), "{text}");
        }
        // Transient: etcd away, restarting, slow, or a leader election.
        for (code, msg) in [
            (tonic::Code::Unavailable, "connection refused"),
            (tonic::Code::DeadlineExceeded, "context deadline exceeded"),
            (tonic::Code::Unknown, "etcdserver: leader changed"),
            (tonic::Code::OutOfRange, "decoded message length too large"),
            // An expired token: the client authenticates again.
            (
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token",
            ),
        ] {
            assert!(!classify(grpc(code, msg)).is_permanent(), "{msg}");
        }
        assert!(!permanent_text(
            "transport error: Connection refused (os error 111)"
        ));
    }

    #[test]
    fn a_prefix_range_ends_after_every_key_of_the_prefix() {
        assert_eq!(prefix_end(b"/a/subnets/"), b"/a/subnets0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
