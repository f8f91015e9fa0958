//! UDP → TUN: receive datagrams (or GRO trains), unwrap each segment as
//! the backend says, check it came from the peer its inner source belongs
//! to, answer ARP for our VTEP, and write the packets to the TUN, TCP runs
//! coalesced into super-packets gathered from the receive buffer.

use super::batch::{Mmsg, Slots, BATCH, OFFLOAD_BATCH, SLOT};
use super::offload::{self, MAX_GSO_SEGMENTS, VNET_HDR_LEN};
use super::{Drain, Worker};
use crate::backend::Decap;
use crate::forward::{ingress, DropReason, Ingress, Tally};
use crate::routes::RouteSnapshot;
use crate::wire::ether::ArpRepr;
use crate::wireguard::{Opened, Wg};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

/// Receive errors in a row (no datagram between them) after which the
/// socket is taken as broken.
const MAX_RX_ERRORS_IN_A_ROW: u32 = 10_000;

/// Whether a receive error only reports an ICMP error about an earlier
/// send (a peer down or unreachable): normal, however often it comes.
fn from_icmp(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EMSGSIZE)
    )
}

/// Receive errors since the last datagram: ICMP reports are normal however
/// often they come; any other error that repeats [`MAX_RX_ERRORS_IN_A_ROW`]
/// times with no datagram between is a broken socket.
#[derive(Debug, Default)]
struct RxErrors {
    in_a_row: u32,
}

impl RxErrors {
    /// One error: `Err` when the socket is to be taken as broken.
    fn on_error(&mut self, e: &io::Error) -> io::Result<()> {
        if !from_icmp(e) {
            self.in_a_row += 1;
        }
        if self.in_a_row >= MAX_RX_ERRORS_IN_A_ROW {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "receiving on the UDP socket failed {} times in a row: {e}",
                    self.in_a_row
                ),
            ));
        }
        Ok(())
    }

    /// A datagram arrived (or the socket was drained).
    fn on_success(&mut self) {
        self.in_a_row = 0;
    }
}

/// Datagrams (or GRO trains) in batches; each inner packet validated; with
/// a vnet TUN, runs of one TCP flow are coalesced into one write.
pub(super) fn udp_to_tun(w: &Worker) -> Drain<'_> {
    let batch = if w.caps.udp_gro { OFFLOAD_BATCH } else { BATCH };
    let mut slots = Slots::new(batch, SLOT);
    let mut mmsg = Mmsg::new(batch, batch);
    // (offset, length) of each deliverable packet in the batch.
    let mut pkts: Vec<(usize, usize)> = Vec::with_capacity(batch * MAX_GSO_SEGMENTS);
    let mut gro_head = [0u8; VNET_HDR_LEN + 120];
    let mut gro = offload::GroTable::new();
    let sock = w.sock.as_raw_fd();
    let encap = w.shared.encap;
    let mut errors = RxErrors::default();
    // wireguard: datagrams are opened from the receive slots into `plain`
    // (at the same offsets), and the TUN writes gather from there.
    let wg = w.shared.wg.clone();
    let (mut plain, mut wout) = if wg.is_some() {
        (vec![0u8; slots.bytes().len()], vec![0u8; SLOT + 64])
    } else {
        (Vec::new(), Vec::new())
    };
    Box::new(move || {
        let mut got = 0;
        loop {
            let n = match mmsg.recv(sock, &mut slots) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    // e.g. ECONNREFUSED from an ICMP error about an earlier
                    // send: reported once, consumed by this call. Counted;
                    // the drain ends so the thread waits in poll() instead of
                    // spinning, and an error that never clears (the socket
                    // broken) ends the thread: the daemon exits and its
                    // supervisor restarts it.
                    tracing::debug!(error = %e, "UDP receive error");
                    w.shared
                        .counters
                        .ingress
                        .rx_errors
                        .fetch_add(1, Ordering::Relaxed);
                    errors.on_error(&e)?;
                    break;
                }
            };
            errors.on_success();
            if n == 0 {
                break;
            }
            got += n;
            let mut t = Tally::default();
            pkts.clear();
            let routes = w.shared.routes.load();
            let accept = w.shared.accept_unknown_peers;
            for i in 0..n {
                let from = *slots.addr[i].ip();
                let (start, len) = (slots.start(i), slots.len[i]);
                let seg = if slots.gso[i] == 0 {
                    len.max(1)
                } else {
                    slots.gso[i]
                };
                t.udp_rx_bytes += len as u64;
                if len == 0 {
                    t.udp_rx_packets += 1;
                    t.drop(DropReason::Malformed);
                    continue;
                }
                if let Some(wg) = &wg {
                    let mut off = 0;
                    while off < len {
                        let l = seg.min(len - off);
                        t.udp_rx_packets += 1;
                        let at = start + off;
                        let d = &slots.bytes()[at..at + l];
                        let out = &mut plain[at..at + l];
                        let to_flush = match wg.open(slots.addr[i], d, out) {
                            Opened::Packet(n, peer) => {
                                // Cryptokey routing checked the source; the
                                // rest of the checks are the udp backend's.
                                match ingress(&mut plain[at..at + n], from, &routes, true) {
                                    Ingress::Deliver => pkts.push((at, n)),
                                    Ingress::Drop(r) => t.drop(r),
                                }
                                Some(peer)
                            }
                            Opened::Reply(n, peer) => {
                                let _ = w.tx.send_to(&plain[at..at + n], slots.addr[i]);
                                Some(peer)
                            }
                            Opened::Nothing(peer) => Some(peer),
                            Opened::Drop(r) => {
                                t.drop(r);
                                None
                            }
                        };
                        if let Some(peer) = to_flush {
                            // A session just came up: what waited for it goes.
                            while let Some(n) = Wg::next_waiting(&peer, &mut wout) {
                                if w.tx.send_to(&wout[..n], peer.endpoint).is_ok() {
                                    t.udp_tx_packets += 1;
                                }
                            }
                        }
                        off += l;
                    }
                    continue;
                }
                let buf = slots.bytes_mut();
                let mut off = 0;
                while off < len {
                    let l = seg.min(len - off);
                    t.udp_rx_packets += 1;
                    let d = &mut buf[start + off..start + off + l];
                    match encap.decap(d) {
                        Decap::Packet(inner) => {
                            match ingress(&mut d[inner..], from, &routes, accept) {
                                Ingress::Deliver => pkts.push((start + off + inner, l - inner)),
                                Ingress::Drop(r) => t.drop(r),
                            }
                        }
                        Decap::Arp(req) => arp_reply(w, &req, from, &routes, &mut t),
                        Decap::Drop(r) => t.drop(r),
                    }
                    off += l;
                }
            }
            let delivered = if wg.is_some() {
                &plain[..]
            } else {
                slots.bytes()
            };
            write_tun(w, delivered, &pkts, &mut gro, &mut gro_head, &mut t);
            w.shared.counters.ingress.add(&t);
            w.shared.counters.rx_batch(t.udp_rx_packets as usize);
            w.shared.counters.worker_rx(w.index, t.udp_rx_packets);
            if n < slots.count() {
                break;
            }
        }
        Ok(got)
    })
}

/// Answers an ARP request for our VTEP address from a known peer (a kernel
/// VXLAN node asks when its neighbour entry for us is missing).
fn arp_reply(w: &Worker, req: &ArpRepr, from: Ipv4Addr, routes: &RouteSnapshot, t: &mut Tally) {
    let Some(own) = routes.local() else {
        return;
    };
    let sender = routes.lookup(req.sender_ip);
    match w.shared.encap.arp_answer(req, own.network(), from, sender) {
        Some(answer) => {
            let to = sender.expect("answered only for a known sender").addr;
            if w.tx.send_to(&answer, to).is_ok() {
                t.arp_replies += 1;
            }
        }
        None => t.drop(DropReason::Spoofed),
    }
}

/// Writes the batch's packets to the TUN, coalescing each TCP flow's runs
/// (across interleaved flows, see [`offload::GroTable`]) when the TUN takes
/// vnet headers: one header built in `head`, the payloads gathered from
/// where they were received (no copy).
fn write_tun(
    w: &Worker,
    buf: &[u8],
    pkts: &[(usize, usize)],
    gro: &mut offload::GroTable,
    head: &mut [u8],
    t: &mut Tally,
) {
    let slice = |&(s, l): &(usize, usize)| &buf[s..s + l];
    if !w.tun.vnet_hdr() {
        for p in pkts {
            if w.tun_write(slice(p)).is_ok() {
                t.tun_tx_packets += 1;
            } else {
                t.drop(DropReason::TunWriteError);
            }
        }
        return;
    }
    gro.group(pkts.len(), |i| slice(&pkts[i]));
    for k in 0..gro.items() {
        let item = gro.item(k);
        let run = item.len();
        // A lone verified segment too: as CHECKSUM_PARTIAL the kernel
        // does not sum its payload a second time.
        let ok = if gro.verified(k) {
            let run_pkts = item.map(|i| slice(&pkts[i]));
            match offload::coalesce_header(run_pkts.clone(), head) {
                Ok((hl, h)) => w
                    .tun
                    .write_gather(&head[..hl], run_pkts.map(|p| &p[h..]))
                    .is_ok(),
                Err(_) => false,
            }
        } else {
            let i = item.clone().next().expect("an item has a packet");
            w.tun_write(slice(&pkts[i])).is_ok()
        };
        if ok {
            t.tun_tx_packets += run as u64;
        } else {
            t.drop_n(DropReason::TunWriteError, run as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_reports_never_count_as_a_broken_socket() {
        for e in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::EMSGSIZE,
        ] {
            assert!(from_icmp(&io::Error::from_raw_os_error(e)), "{e}");
        }
        for e in [libc::EBADF, libc::ENOTSOCK, libc::EFAULT, libc::ENOMEM] {
            assert!(!from_icmp(&io::Error::from_raw_os_error(e)), "{e}");
        }
    }

    #[test]
    fn only_an_error_repeated_with_no_datagram_between_breaks_the_socket() {
        let bad = io::Error::from_raw_os_error(libc::ENOMEM);
        let icmp = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let mut r = RxErrors::default();
        // ICMP reports never add up, interleaved or alone.
        for _ in 0..3 * MAX_RX_ERRORS_IN_A_ROW {
            r.on_error(&icmp).unwrap();
        }
        // An ICMP report between does not reset the run; a datagram does.
        for _ in 0..MAX_RX_ERRORS_IN_A_ROW - 1 {
            r.on_error(&bad).unwrap();
            r.on_error(&icmp).unwrap();
        }
        r.on_success();
        for _ in 0..MAX_RX_ERRORS_IN_A_ROW - 1 {
            r.on_error(&bad).unwrap();
        }
        let e = r.on_error(&bad).unwrap_err();
        assert!(e.to_string().contains("10000 times in a row"), "{e}");
    }
}
