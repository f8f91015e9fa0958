//! Micro benchmarks of the per-packet work. Run: `cargo bench --bench datapath`.
//! The end-to-end namespace benchmark (iperf3 through the tunnel against
//! direct veth and kernel VXLAN) is `benches/e2e.sh`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dashmap::DashMap;
use flannel::forward::{egress, ingress};
use flannel::routes::{RouteSnapshot, RouteTable};
use ipnetwork::Ipv4Network;
use std::net::{Ipv4Addr, SocketAddrV4};

/// `n` /24 leases out of 10.0.0.0/8, each with its own peer.
fn leases(n: usize) -> Vec<(Ipv4Network, SocketAddrV4)> {
    (0..n as u32)
        .map(|i| {
            let net = Ipv4Addr::from(0x0a00_0000 | ((i + 1) << 8));
            let peer = SocketAddrV4::new(Ipv4Addr::from(0xc0a8_0000 | (i & 0xffff)), 8285);
            (Ipv4Network::new(net, 24).unwrap(), peer)
        })
        .collect()
}

/// 64 destinations spread over the leases (every 8th one a miss).
fn probes(n: usize) -> Vec<Ipv4Addr> {
    (0..64u32)
        .map(|k| {
            let i = (k.wrapping_mul(2_654_435_761) as usize) % n;
            if k % 8 == 7 {
                Ipv4Addr::new(11, 0, 0, k as u8)
            } else {
                Ipv4Addr::from(0x0a00_0000 | ((i as u32 + 1) << 8) | (k & 0xff))
            }
        })
        .collect()
}

/// One route lookup per element: our snapshot (through the ArcSwap load the
/// data path does per batch), a DashMap keyed by subnet, and flannel's
/// linear scan.
fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in [10usize, 1_000, 10_000] {
        let routes = leases(n);
        let dsts = probes(n);
        g.throughput(Throughput::Elements(dsts.len() as u64));

        let table = RouteTable::new(RouteSnapshot::new(routes.clone()));
        g.bench_with_input(BenchmarkId::new("snapshot", n), &dsts, |b, dsts| {
            b.iter(|| {
                let snap = table.load();
                let mut hits = 0usize;
                for d in dsts {
                    hits += snap.lookup(black_box(*d)).is_some() as usize;
                }
                hits
            })
        });

        let map: DashMap<u32, SocketAddrV4> = routes
            .iter()
            .map(|(n, p)| (u32::from(n.network()), *p))
            .collect();
        g.bench_with_input(BenchmarkId::new("dashmap", n), &dsts, |b, dsts| {
            b.iter(|| {
                let mut hits = 0usize;
                for d in dsts {
                    let key = u32::from(black_box(*d)) & 0xffff_ff00;
                    hits += map.get(&key).is_some() as usize;
                }
                hits
            })
        });

        g.bench_with_input(BenchmarkId::new("linear", n), &dsts, |b, dsts| {
            b.iter(|| {
                let mut hits = 0usize;
                for d in dsts {
                    let d = black_box(*d);
                    hits += routes.iter().any(|(n, _)| n.contains(d)) as usize;
                }
                hits
            })
        });
    }
    g.finish();
}

fn packet(len: usize, ttl: u8) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = ttl;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 1, 2]);
    p[16..20].copy_from_slice(&[10, 0, 7, 9]);
    let ck = flannel::wire::checksum(&p[..20]);
    p[10..12].copy_from_slice(&ck.to_be_bytes());
    p
}

/// Per-packet work of each direction on a 1472-byte packet (TUN MTU):
/// validate, route (and on receive the sender check), TTL + incremental
/// checksum (encapsulation is the packet itself, so nothing is copied).
/// TTL is reset so every iteration forwards.
fn per_packet(c: &mut Criterion) {
    let mut g = c.benchmark_group("per_packet");
    let snap = RouteSnapshot::new(leases(1_000));
    let mut p = packet(1472, 64);
    g.throughput(Throughput::Bytes(p.len() as u64));
    g.bench_function("egress_tun_to_udp", |b| {
        b.iter(|| {
            p[8] = 64;
            egress(black_box(&mut p), &snap)
        })
    });
    let mut p = packet(1472, 64);
    // Inner 10.0.1.2 -> 10.0.7.9: the sender owns 10.0.1.0/24, we own 10.0.7.0/24.
    let from = Ipv4Addr::from(0xc0a8_0000u32);
    let local = RouteSnapshot::new(leases(1_000)).with_local("10.0.7.0/24".parse().unwrap());
    g.bench_function("ingress_udp_to_tun", |b| {
        b.iter(|| {
            // Restore TTL and checksum so the header stays valid.
            p[8] = 64;
            p[10] = 0;
            p[11] = 0;
            let ck = flannel::wire::checksum(&p[..20]);
            p[10..12].copy_from_slice(&ck.to_be_bytes());
            let v = ingress(black_box(&mut p), from, &local, false);
            debug_assert_eq!(v, flannel::forward::Ingress::Deliver);
            v
        })
    });
    g.finish();
}

/// A 64 KB IPv4/TCP super-packet as the TUN hands it over with TSO.
fn tso_packet() -> (Vec<u8>, flannel::datapath::offload::VnetHdr) {
    let payload = 65535 - 52;
    let mut p = packet(52 + payload, 64);
    p[9] = 6;
    p[32] = 8 << 4; // 32-byte TCP header (timestamps)
    p[33] = 0x10;
    let ck = {
        p[10] = 0;
        p[11] = 0;
        flannel::wire::checksum(&p[..20])
    };
    p[10..12].copy_from_slice(&ck.to_be_bytes());
    let hdr = flannel::datapath::offload::VnetHdr {
        flags: flannel::datapath::offload::F_NEEDS_CSUM,
        gso_type: flannel::datapath::offload::GSO_TCPV4,
        hdr_len: 52,
        gso_size: 1420,
        csum_start: 20,
        csum_offset: 16,
    };
    (p, hdr)
}

/// Per 64 KB super-packet: building the 47 segment headers with their TCP
/// checksums (the zero-copy split the data path does), and checking +
/// coalescing those 47 segments back into one super-packet header.
fn offload(c: &mut Criterion) {
    use flannel::datapath::offload::{coalesce_header, GroTable, Segments};
    let mut g = c.benchmark_group("offload_64k");
    let (p, hdr) = tso_packet();
    g.throughput(Throughput::Bytes(p.len() as u64));
    let segs = Segments::of(&p, &hdr).unwrap();
    let mut headers = vec![0u8; segs.header_bytes(segs.count())];
    g.bench_function("split_headers", |b| {
        b.iter(|| {
            segs.write_headers(black_box(&p), 0..segs.count(), &mut headers)
                .unwrap()
        })
    });
    let all = segs.collect(&p).unwrap();
    let segs: Vec<&[u8]> = all.iter().map(|s| &s[..]).collect();
    let mut head = [0u8; 200];
    let mut table = GroTable::new();
    g.bench_function("coalesce", |b| {
        b.iter(|| {
            table.group(segs.len(), |i| segs[i]);
            assert_eq!(table.items(), 1);
            coalesce_header(table.item(0).map(|i| segs[i]), &mut head).unwrap()
        })
    });
    g.finish();
}

/// The data path's previous sum (big-endian 64-bit words split into 32-bit
/// halves), kept here as the before of the checksum rewrite.
fn sum_before(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes(c.try_into().unwrap());
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    acc + flannel::wire::sum_reference(chunks.remainder(), 0)
}

/// A zeroed `len`-byte window of `v` that starts on a 4 KB boundary.
fn page_aligned(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    v.resize(len + 4096, 0);
    let at = v.as_ptr().align_offset(4096);
    &mut v[at..at + len]
}

/// The checksum against a memcpy of the same buffer, in one run: 40 B (a
/// header), 1448 B (a TCP segment), 64 KB (a super-packet).
///
/// Both buffers start on a page boundary. Two vectors allocated one after
/// the other lie (len + 16) bytes apart, and on AMD Zen 3 `rep movsb` (glibc's
/// memcpy from 4 KB up, and the kernel's copies with FSRM) runs at 2–3 GB/s
/// instead of 30–55 when `(dst - src) mod 4096` is 1–31 (measured 2026-12-07):
/// the 64 KB memcpy baseline measured that stall, not a copy.
fn checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    let (mut src_buf, mut dst_buf) = (Vec::new(), Vec::new());
    for len in [40usize, 1448, 65536] {
        let src = page_aligned(&mut src_buf, len);
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i * 31 + 7) as u8;
        }
        let src: &[u8] = src;
        let dst = page_aligned(&mut dst_buf, len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("sum", len), &src, |b, s| {
            b.iter(|| flannel::wire::sum(black_box(s), 0))
        });
        g.bench_with_input(BenchmarkId::new("sum_before", len), &src, |b, s| {
            b.iter(|| sum_before(black_box(s), 0))
        });
        g.bench_with_input(BenchmarkId::new("sum_reference", len), &src, |b, s| {
            b.iter(|| flannel::wire::sum_reference(black_box(s), 0))
        });
        g.bench_with_input(BenchmarkId::new("memcpy", len), &src, |b, s| {
            b.iter(|| {
                dst.copy_from_slice(black_box(s));
                black_box(&dst);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, route_lookup, per_packet, offload, checksum);
criterion_main!(benches);
