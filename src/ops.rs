//! Operating the daemon: `/healthz` and Prometheus `/metrics` over a tiny
//! HTTP/1.1 responder, systemd readiness (`sd_notify`), and the control
//! plane's counters. Exposition uses `prometheus-client`; the data path's
//! own atomics are read at scrape time, so the packet loops never touch a
//! metrics library.

use crate::forward::{Counters, DropReason, BATCH_BOUNDS, WORKER_METRICS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Control-plane state and counters, shared with the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    /// The lease is held, the TUN is up and subnet.env written (/readyz).
    pub ready: AtomicBool,
    /// A data-path thread has failed (/healthz says 503 until the exit).
    pub failed: AtomicBool,
    pub peers: AtomicU64,
    pub etcd_reconnects: AtomicU64,
    pub lease_renewals: AtomicU64,
    pub watch_resyncs: AtomicU64,
    pub watch_compactions: AtomicU64,
    /// Lease keys ignored now (malformed, or not a valid lease).
    pub leases_ignored: AtomicU64,
    /// The offloads the data path negotiated: TUN TSO, TUN USO, UDP GSO, UDP GRO.
    pub offloads: [AtomicBool; 4],
    /// Ops-port connections closed because [`MAX_CONNECTIONS`] were open.
    pub ops_refused: AtomicU64,
    /// When our lease expires (Unix seconds; 0: no TTL or no lease yet).
    pub lease_expiry_unix: AtomicU64,
    /// What `/status` (and `flanneld status`) shows.
    pub status: std::sync::Mutex<StatusView>,
}

/// The daemon's state for `/status`: what an operator asks first.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StatusView {
    pub version: String,
    pub backend: String,
    pub network: String,
    pub subnet: Option<String>,
    pub tun: Option<String>,
    pub mtu: Option<u32>,
    pub public_ip: String,
    /// Unix seconds.
    pub lease_expires: Option<u64>,
    /// Unix seconds of etcd's last answer.
    pub last_etcd_contact: Option<u64>,
    pub peers: Vec<PeerView>,
    #[serde(default)]
    pub ready: bool,
}

/// A duration for people: `42 s`, `5 min`, `23 h 59 min`.
fn human(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h {} min", secs / 3600, secs / 60 % 60),
    }
}

impl StatusView {
    /// What `flanneld status` prints, at Unix time `now`.
    pub fn render(&self, now: u64) -> String {
        let mut o = format!(
            "flanneld {}: {}\nbackend   {}\nnetwork   {}\n",
            self.version,
            if self.ready { "ready" } else { "not ready" },
            self.backend,
            self.network
        );
        match &self.subnet {
            Some(sn) => {
                o += &format!(
                    "subnet    {sn} on {} (MTU {}), public IP {}\n",
                    self.tun.as_deref().unwrap_or("?"),
                    self.mtu
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "?".into()),
                    self.public_ip
                )
            }
            None => o += "subnet    none yet\n",
        }
        o += &match self.lease_expires {
            Some(t) if t > now => format!("lease     expires in {} (Unix {t})\n", human(t - now)),
            Some(t) => format!("lease     EXPIRED {} ago (Unix {t})\n", human(now - t)),
            None => "lease     no expiry (a reservation) or not written yet\n".to_string(),
        };
        o += &match self.last_etcd_contact {
            Some(t) => format!(
                "etcd      last answer {} ago\n",
                human(now.saturating_sub(t))
            ),
            None => "etcd      no answer yet\n".to_string(),
        };
        o += &format!("peers     {}\n", self.peers.len());
        for p in &self.peers {
            o += &format!("  {} via {}\n", p.subnet, p.public_ip);
        }
        o
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeerView {
    pub subnet: String,
    pub public_ip: String,
}

/// Names of [`Stats::offloads`], in order, as the `feature` label of `flannel_offload`.
pub const OFFLOAD_FEATURES: [&str; 4] = ["tun_tso", "tun_uso", "udp_gso", "udp_gro"];

impl Stats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct FlannelCollector {
    data: Arc<Counters>,
    stats: Arc<Stats>,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for FlannelCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let d = self.data.snapshot();
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        {
            let mut m = e.encode_descriptor(
                "flannel_tun_packets",
                "Packets read from the TUN (egress) and written to it (ingress).",
                None,
                MetricType::Counter,
            )?;
            for (dir, v) in [("read", d.tun_rx_packets), ("written", d.tun_tx_packets)] {
                ConstCounter::new(v).encode(m.encode_family(&[("direction", dir)])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "flannel_udp_packets",
                "Tunnel packets sent and received over UDP (a GSO send or GRO train counts each packet in it).",
                None,
                MetricType::Counter,
            )?;
            for (dir, v) in [("sent", d.udp_tx_packets), ("received", d.udp_rx_packets)] {
                ConstCounter::new(v).encode(m.encode_family(&[("direction", dir)])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "flannel_worker_received_datagrams",
                "Tunnel datagrams each data-path worker received (a GRO train counts each datagram in it).",
                None,
                MetricType::Counter,
            )?;
            let workers = (get(&self.data.workers) as usize).clamp(1, WORKER_METRICS);
            for (k, v) in self.data.worker_rx[..workers].iter().enumerate() {
                let k = k.to_string();
                ConstCounter::new(get(v)).encode(m.encode_family(&[("worker", k.as_str())])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "flannel_udp_payload_bytes",
                "UDP payload bytes (the tunnelled packets with any backend header) sent and received.",
                None,
                MetricType::Counter,
            )?;
            for (dir, v) in [("sent", d.udp_tx_bytes), ("received", d.udp_rx_bytes)] {
                ConstCounter::new(v).encode(m.encode_family(&[("direction", dir)])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "flannel_dropped_packets",
                "Packets dropped, by direction (egress: TUN to UDP, ingress: UDP to TUN) and reason.",
                None,
                MetricType::Counter,
            )?;
            for (dir, t) in [
                ("egress", self.data.egress.snapshot()),
                ("ingress", self.data.ingress.snapshot()),
            ] {
                for (r, reason) in DropReason::ALL {
                    ConstCounter::new(t.dropped(r))
                        .encode(m.encode_family(&[("direction", dir), ("reason", reason)])?)?;
                }
            }
        }
        counter(
            &mut e,
            "flannel_icmp_ratelimited",
            "ICMP errors not sent because the rate limit (1000/s, burst 50, one for all workers) was reached.",
            d.icmp_ratelimited,
        )?;
        counter(
            &mut e,
            "flannel_gso_fallbacks",
            "UDP GSO sends the kernel refused (path MTU below the segment size, IPsec) and that were resent as plain datagrams.",
            d.gso_fallbacks,
        )?;
        gauge(
            &mut e,
            "flannel_gso_off_peers",
            "Peers whose UDP GSO send was refused: sent TCP cut to the path MTU (and plain datagrams for what cannot be cut), or plain datagrams only after a second refusal (summed over workers; each entry expires after 10 min).",
            self.data.gso_off_peers.load(Ordering::Relaxed) as i64,
        )?;
        counter(
            &mut e,
            "flannel_icmp_sent",
            "ICMP errors sent back into the TUN.",
            d.icmp_sent,
        )?;
        counter(
            &mut e,
            "flannel_ops_connections_refused",
            "Connections to this ops port closed at once because 64 were already open.",
            self.stats.ops_refused.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            "flannel_udp_receive_errors",
            "Receive calls on the UDP sockets that failed (e.g. an ICMP port unreachable about an earlier send); 10000 in a row end the daemon.",
            self.data.ingress.rx_errors.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            "flannel_arp_replies",
            "ARP requests for our VTEP address (our subnet's .0) answered by the vxlan backend.",
            d.arp_replies,
        )?;
        gauge(
            &mut e,
            "flannel_peers",
            "Peers (other hosts' leases) in the route table.",
            get(&s.peers) as i64,
        )?;
        gauge(
            &mut e,
            "flannel_lease_expiry_timestamp_seconds",
            "When this host's lease expires unless renewed (Unix time; 0: no TTL or no lease yet).",
            get(&s.lease_expiry_unix) as i64,
        )?;
        {
            // A gauge named *_info (Prometheus' convention; an OpenMetrics
            // info type is not read by every consumer, promtool included).
            let mut m = e.encode_descriptor(
                "flannel_build_info",
                "Always 1; the build's version in a label.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64)
                .encode(m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)?;
        }
        gauge(
            &mut e,
            "flannel_ready",
            "1 while ready (/readyz): the lease held, the TUN up, subnet.env written.",
            s.ready.load(Ordering::Relaxed) as i64,
        )?;
        {
            let mut m = e.encode_descriptor(
                "flannel_offload",
                "1 for each offload the data path negotiated with the kernel (--offload=auto), else 0.",
                None,
                MetricType::Gauge,
            )?;
            for (feature, on) in OFFLOAD_FEATURES.iter().zip(&s.offloads) {
                ConstGauge::new(on.load(Ordering::Relaxed) as i64)
                    .encode(m.encode_family(&[("feature", *feature)])?)?;
            }
        }
        counter(
            &mut e,
            "flannel_etcd_reconnects",
            "Times etcd came back after an outage.",
            get(&s.etcd_reconnects),
        )?;
        counter(
            &mut e,
            "flannel_lease_renewals",
            "Successful lease renewals.",
            get(&s.lease_renewals),
        )?;
        counter(
            &mut e,
            "flannel_watch_resyncs",
            "Re-lists of the leases (after a compacted watch, or to take our lease back).",
            get(&s.watch_resyncs),
        )?;
        gauge(
            &mut e,
            "flannel_leases_ignored",
            "Keys under the subnets prefix ignored now: malformed, not a SubnetLen lease inside the Network, or a PublicIP no host can have.",
            get(&s.leases_ignored) as i64,
        )?;
        counter(
            &mut e,
            "flannel_watch_compactions",
            "Times the lease watch's revision had been compacted away (each forces a re-list).",
            get(&s.watch_compactions),
        )?;
        {
            let mut m = e.encode_descriptor(
                "flannel_batch_size",
                "Packets per batch of the data path.",
                None,
                MetricType::Histogram,
            )?;
            for (dir, buckets, total) in [
                ("egress", &self.data.tx_batches, &self.data.tx_batch_sum),
                ("ingress", &self.data.rx_batches, &self.data.rx_batch_sum),
            ] {
                let counts: Vec<u64> = buckets.iter().map(get).collect();
                let mut bounds: Vec<(f64, u64)> = BATCH_BOUNDS
                    .iter()
                    .copied()
                    .zip(counts.iter().copied())
                    .collect();
                bounds.push((f64::MAX, counts[counts.len() - 1]));
                let count = counts.iter().sum();
                let sum = get(total) as f64;
                m.encode_family(&[("direction", dir)])?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &bounds, None,
                    )?;
            }
        }
        Ok(())
    }
}

/// The metrics registry for one daemon.
pub fn registry(data: Arc<Counters>, stats: Arc<Stats>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(FlannelCollector { data, stats }));
    r
}

/// Renders the registry in Prometheus text format.
/// OpenMetrics text as Prometheus' classic text format (0.0.4), for
/// clients that do not ask for OpenMetrics (curl, promtool, older
/// scrapers): a counter's HELP and TYPE name its `_total` samples, no
/// `# UNIT`, no `# EOF`.
pub fn to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out += &format!("{p}{name}_total {tail}\n");
                } else {
                    out += l;
                    out.push('\n');
                }
            }
            None => {
                out += l;
                out.push('\n');
            }
        }
    }
    out
}

pub fn render(r: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r).expect("writing to a String");
    out
}

/// Serves `GET /healthz` (liveness: 200 unless the data path failed),
/// `GET /readyz` (200 once the lease is held, the TUN up and subnet.env
/// written) and `GET /metrics`.
/// Connections served at once; more are closed as soon as accepted, so a
/// flood of idle clients cannot use up the daemon's descriptors (the TUN
/// and sockets need them) or starve a liveness probe for long.
pub const MAX_CONNECTIONS: usize = 64;
/// The time one connection gets for its whole request and answer, however
/// slowly it sends.
pub const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, stats: Arc<Stats>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /healthz and /metrics");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused_logged = false;
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: the descriptor is freed now, not after a timeout.
            Stats::inc(&stats.ops_refused);
            if !refused_logged {
                refused_logged = true;
                tracing::warn!("more than {MAX_CONNECTIONS} connections to the ops port at once; closing the extra ones (flannel_ops_connections_refused_total)");
            }
            drop(conn);
            continue;
        };
        let (registry, stats) = (registry.clone(), stats.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(REQUEST_DEADLINE, answer(conn, &registry, &stats)).await;
        });
    }
}

/// Reads one request and answers it.
async fn answer(mut conn: tokio::net::TcpStream, registry: &Registry, stats: &Stats) {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    // Read the request head: the request line, and Accept for /metrics.
    // The caller's deadline bounds the whole exchange.
    while n < buf.len() {
        match conn.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..n].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let openmetrics = head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        // Liveness, as flannel's /healthz: the process serves and
        // its data path is alive (a dead data path exits the daemon).
        ("GET", "/healthz") if !stats.failed.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", "ok\n".to_string())
        }
        ("GET", "/healthz") => (
            "503 Service Unavailable",
            "text/plain",
            "data path failed\n".to_string(),
        ),
        // Readiness: lease held, TUN up, subnet.env written.
        ("GET", "/readyz") if stats.ready.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", "ready\n".to_string())
        }
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".to_string(),
        ),
        ("GET", "/status") => {
            let mut v = stats
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            v.ready = stats.ready.load(Ordering::Relaxed);
            (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
            )
        }
        // OpenMetrics to whoever asks for it (Prometheus does), the
        // classic text format to everyone else.
        ("GET", "/metrics") if openmetrics => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(registry),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            to_prometheus_text(&render(registry)),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
}

/// Sends a systemd notification (`READY=1`, `STOPPING=1`, `STATUS=…`) to
/// `$NOTIFY_SOCKET`, if set. Abstract sockets (`@name`) are supported.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!("sd_notify: {e}"),
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = res {
        tracing::warn!("sd_notify {msg:?} to {path:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::Tally;

    #[test]
    fn metrics_render_counters_drops_and_histograms() {
        let data = Arc::new(Counters::default());
        data.egress.add(&Tally {
            udp_tx_packets: 7,
            ..Tally::default()
        });
        data.ingress.add(&Tally {
            drops: {
                let mut d = [0; DropReason::COUNT];
                d[DropReason::Spoofed.index()] = 3;
                d
            },
            ..Tally::default()
        });
        data.tx_batch(5);
        data.tx_batch(64);
        let stats = Arc::new(Stats::default());
        stats.peers.store(4, Ordering::Relaxed);
        let text = render(&registry(data, stats));
        assert!(
            text.contains(r#"flannel_udp_packets_total{direction="sent"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"flannel_dropped_packets_total{direction="ingress",reason="spoofed"} 3"#
            ),
            "{text}"
        );
        assert!(text.contains("flannel_peers 4"), "{text}");
        assert!(
            text.contains(r#"flannel_batch_size_bucket{le="8.0",direction="egress"} 1"#)
                || text.contains(r#"flannel_batch_size_bucket{direction="egress",le="8.0"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"flannel_batch_size_count{direction="egress"} 2"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn status_reads_as_an_operator_needs_it() {
        let v = StatusView {
            version: "0.1.0".into(),
            backend: "udp".into(),
            network: "10.5.0.0/16".into(),
            subnet: Some("10.5.20.0/24".into()),
            tun: Some("flannel0".into()),
            mtu: Some(1472),
            public_ip: "192.168.1.2".into(),
            lease_expires: Some(1_000 + 86_340),
            last_etcd_contact: Some(997),
            peers: vec![PeerView {
                subnet: "10.5.3.0/24".into(),
                public_ip: "192.168.1.3".into(),
            }],
            ready: true,
        };
        let text = v.render(1_000);
        assert!(text.starts_with("flanneld 0.1.0: ready\n"), "{text}");
        assert!(
            text.contains("subnet    10.5.20.0/24 on flannel0 (MTU 1472), public IP 192.168.1.2"),
            "{text}"
        );
        assert!(text.contains("lease     expires in 23 h 59 min"), "{text}");
        assert!(text.contains("etcd      last answer 3 s ago"), "{text}");
        assert!(text.contains("  10.5.3.0/24 via 192.168.1.3"), "{text}");
        let late = v.render(1_000 + 90_000);
        assert!(late.contains("lease     EXPIRED 61 min ago"), "{late}");
    }

    #[test]
    fn the_classic_text_format_names_counters_by_their_samples() {
        let om = "# HELP flannel_x Xs.\n# TYPE flannel_x counter\nflannel_x_total 3\n# HELP flannel_g G.\n# TYPE flannel_g gauge\n# UNIT flannel_g seconds\nflannel_g 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP flannel_x_total Xs.\n# TYPE flannel_x_total counter\nflannel_x_total 3\n# HELP flannel_g G.\n# TYPE flannel_g gauge\nflannel_g 1\n"
        );
    }
}
