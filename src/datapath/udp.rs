//! The backend's UDP sockets: binding (with SO_REUSEPORT for a worker
//! group), the per-worker send sockets, and probing the UDP offloads. The
//! batched send/receive over them is [`super::batch`].

use super::batch::{set_int_opt, SOL_UDP, UDP_GRO, UDP_SEGMENT};
use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

/// Turns on `UDP_GRO` and probes `UDP_SEGMENT` (by setting a socket default
/// and clearing it again); returns (GRO on, GSO available).
pub fn enable_offloads(s: &UdpSocket) -> (bool, bool) {
    let fd = s.as_raw_fd();
    let gro = set_int_opt(fd, SOL_UDP, UDP_GRO, 1).is_ok();
    let gso = set_int_opt(fd, SOL_UDP, UDP_SEGMENT, 1400).is_ok()
        && set_int_opt(fd, SOL_UDP, UDP_SEGMENT, 0).is_ok();
    (gro, gso)
}

/// A worker's send socket on `port` (Backend.Port + 1 + k). A port that is
/// taken is an error, never a silent move to an ephemeral port: firewalls
/// are told which source ports our datagrams come from.
pub fn send_socket(bind: SocketAddrV4, port: u16) -> io::Result<UdpSocket> {
    bind_udp(SocketAddrV4::new(*bind.ip(), port), false).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                format!("{e}: --udp-source-ports=per-worker sends worker k's datagrams from Backend.Port+1+k and UDP {port} is taken; free it, or use --udp-source-ports=fixed (every datagram from Backend.Port)"),
            )
        } else {
            e
        }
    })
}

/// The path MTU the kernel holds towards `to` (a route's `mtu`, or one
/// learned from ICMP "fragmentation needed"): `IP_MTU` of a UDP socket
/// connected to it. Nothing is sent.
pub fn path_mtu(to: SocketAddrV4) -> io::Result<usize> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(to)?;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, and an int-sized out buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mtu as usize)
}

/// Binds a backend UDP socket to `addr:port`, non-blocking.
pub fn bind_udp(addr: SocketAddrV4, reuse_port: bool) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    // Bigger buffers absorb bursts between batches; failure only costs speed.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {addr}: {e}")))?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Flow steering for a worker group: which of `n` sockets (and so which
/// worker) a received datagram goes to, by the inner IPv4 packet that
/// starts `inner` bytes into its payload (0 on udp, the VXLAN + Ethernet
/// prefix on vxlan).
///
/// Without it, `SO_REUSEPORT` picks by the outer addresses and ports,
/// which are the same for every flow a peer sends from one port (all of
/// them from Go flanneld, which sends from 8285): one worker received
/// them all, and four TCP streams between two hosts moved what one did.
/// With the inner flow picking the socket, different flows spread over
/// the workers, and a flow's two directions meet on one worker (the hash
/// is symmetric).
///
/// The hash: source ^ destination address, and for TCP and UDP that are
/// not fragments, ^ (source port ^ destination port); times 0x9E3779B1,
/// the upper 16 bits, modulo `n`. A datagram too short for a field the
/// hash reads goes to socket 0 (a classic BPF load out of bounds returns
/// 0), as does a non-IPv4 frame on vxlan.
pub fn flow_socket(datagram: &[u8], inner: usize, n: u32) -> u32 {
    let be32 = |at: usize| {
        datagram
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let be16 = |at: usize| {
        datagram
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let hash = || -> Option<u32> {
        if inner >= 2 && be16(inner - 2)? != 0x0800 {
            return None;
        }
        let mut h = be32(inner + 12)? ^ be32(inner + 16)?;
        let proto = *datagram.get(inner + 9)?;
        if (proto == 6 || proto == 17) && be16(inner + 6)? & 0x3fff == 0 {
            let ihl = usize::from(*datagram.get(inner)? & 0xf) * 4;
            let w = be32(inner + ihl)?;
            h ^= ((w >> 16) ^ w) & 0xffff;
        }
        Some((h.wrapping_mul(0x9E37_79B1) >> 16) % n.max(1))
    };
    hash().unwrap_or(0)
}

/// [`flow_socket`] as a classic BPF program for `SO_ATTACH_REUSEPORT_CBPF`
/// (which runs it on the UDP payload and takes its result as the index of
/// the socket in the group, in the order they were bound).
pub fn flow_steering_program(inner: u32, n: u32) -> Vec<libc::sock_filter> {
    // Classic BPF opcodes (linux/filter.h).
    const LD: u16 = 0x00;
    const LDX: u16 = 0x01;
    const ST: u16 = 0x02;
    const ALU: u16 = 0x04;
    const JMP: u16 = 0x05;
    const RET: u16 = 0x06;
    const MISC: u16 = 0x07;
    const W: u16 = 0x00;
    const H: u16 = 0x08;
    const B: u16 = 0x10;
    const ABS: u16 = 0x20;
    const IND: u16 = 0x40;
    const MEM: u16 = 0x60;
    const MSH: u16 = 0xa0;
    const MUL: u16 = 0x20;
    const AND: u16 = 0x50;
    const RSH: u16 = 0x70;
    const MOD: u16 = 0x90;
    const XOR: u16 = 0xa0;
    const JEQ: u16 = 0x10;
    const JSET: u16 = 0x40;
    const K: u16 = 0x00;
    const X: u16 = 0x08;
    const A: u16 = 0x10;
    const TAX: u16 = 0x00;
    let op = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let hash = [
        op(LD | W | ABS, inner + 12), // A = source address
        op(MISC | TAX, 0),
        op(LD | W | ABS, inner + 16), // ^ destination address
        op(ALU | XOR | X, 0),
        op(ST, 0), // M[0] = A
        op(LD | B | ABS, inner + 9),
        jump(JMP | JEQ | K, 6, 1, 0),   // TCP: ports
        jump(JMP | JEQ | K, 17, 0, 12), // UDP: ports; else done
        op(LD | H | ABS, inner + 6),
        jump(JMP | JSET | K, 0x3fff, 10, 0), // a fragment: done
        op(LDX | B | MSH, inner),            // X = header length
        op(LD | W | IND, inner),             // A = ports
        op(MISC | TAX, 0),
        op(ALU | RSH | K, 16),
        op(ALU | XOR | X, 0),
        op(ALU | AND | K, 0xffff), // source ^ destination port
        op(MISC | TAX, 0),
        op(LD | MEM, 0),
        op(ALU | XOR | X, 0),
        op(ST, 0),
        // done:
        op(LD | MEM, 0),
        op(ALU | MUL | K, 0x9E37_79B1),
        op(ALU | RSH | K, 16),
        op(ALU | MOD | K, n.max(1)),
        op(RET | A, 0),
    ];
    if inner < 2 {
        return hash.to_vec();
    }
    // A prefix ending in an EtherType: anything but IPv4 jumps over the
    // hash to a `ret #0` (socket 0).
    let mut p = vec![
        op(LD | H | ABS, inner - 2),
        jump(JMP | JEQ | K, 0x0800, 0, hash.len() as u8),
    ];
    p.extend(hash);
    p.push(op(RET | K, 0));
    p
}

/// Attaches [`flow_steering_program`] to the `SO_REUSEPORT` group `sock`
/// is in (the `n` sockets bound so far, in order).
pub fn steer_by_inner_flow(sock: &UdpSocket, inner: usize, n: usize) -> io::Result<()> {
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
    let mut prog = flow_steering_program(inner as u32, n as u32);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: fprog points at `prog`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::net::Ipv4Addr;

    /// A datagram payload: `inner` bytes of prefix (ending in `ethertype`),
    /// then an IPv4 header (IHL `ihl`) and four bytes of ports.
    fn datagram(
        inner: usize,
        ethertype: u16,
        ihl: u8,
        proto: u8,
        frag: u16,
        addrs: ([u8; 4], [u8; 4]),
        ports: (u16, u16),
    ) -> Vec<u8> {
        let mut d = vec![0u8; inner + usize::from(ihl) * 4 + 4];
        if inner >= 2 {
            d[inner - 2..inner].copy_from_slice(&ethertype.to_be_bytes());
        }
        let ip = &mut d[inner..];
        ip[0] = 0x40 | ihl;
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[9] = proto;
        ip[12..16].copy_from_slice(&addrs.0);
        ip[16..20].copy_from_slice(&addrs.1);
        let l4 = usize::from(ihl) * 4;
        ip[l4..l4 + 2].copy_from_slice(&ports.0.to_be_bytes());
        ip[l4 + 2..l4 + 4].copy_from_slice(&ports.1.to_be_bytes());
        d
    }

    #[test]
    fn a_flow_and_its_replies_pick_one_socket_and_fragments_ignore_ports() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut used = [0usize; 4];
        for _ in 0..2000 {
            let (a, b): ([u8; 4], [u8; 4]) = (rng.gen(), rng.gen());
            let (p, q): (u16, u16) = (rng.gen(), rng.gen());
            let proto = [6, 17][rng.gen_range(0..2)];
            let there = datagram(0, 0, 5, proto, 0, (a, b), (p, q));
            let back = datagram(0, 0, 5, proto, 0, (b, a), (q, p));
            let k = flow_socket(&there, 0, 4);
            assert_eq!(k, flow_socket(&back, 0, 4));
            used[k as usize] += 1;
            // Fragments of one datagram go together, whatever their ports say.
            let f1 = datagram(0, 0, 5, proto, 0x2000, (a, b), (p, q));
            let f2 = datagram(0, 0, 5, proto, 0x0010, (a, b), (rng.gen(), rng.gen()));
            assert_eq!(flow_socket(&f1, 0, 4), flow_socket(&f2, 0, 4));
        }
        // Flows spread: every socket gets a fair share of 2000.
        assert!(used.iter().all(|&u| u > 350), "{used:?}");
        // Streams from one client differ only in the source port: spread.
        let mut seen = std::collections::HashSet::new();
        for p in 40000..40008 {
            let d = datagram(0, 0, 5, 6, 0, ([10, 5, 1, 0], [10, 5, 2, 0]), (p, 5201));
            seen.insert(flow_socket(&d, 0, 2));
        }
        assert_eq!(seen.len(), 2);
        // Too short, or not IPv4 inside a VXLAN frame: socket 0.
        assert_eq!(flow_socket(&[0x45; 19], 0, 4), 0);
        let arp = datagram(22, 0x0806, 5, 6, 0, ([1, 2, 3, 4], [5, 6, 7, 8]), (1, 2));
        assert_eq!(flow_socket(&arp, 22, 4), 0);
    }

    /// The kernel runs the classic BPF program on real datagrams (over
    /// loopback) and each lands on the socket `flow_socket` names:
    /// TCP, UDP and ICMP, fragments, options, short datagrams, VXLAN
    /// frames with IPv4 and ARP inside, for groups of 2, 3 and 4.
    #[test]
    fn the_kernel_delivers_each_datagram_to_the_socket_flow_socket_names() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (n, inner) in [(2usize, 0usize), (3, 0), (4, 22), (2, 22)] {
            let first = bind_udp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), true).unwrap();
            let addr = match first.local_addr().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                _ => unreachable!(),
            };
            let mut group = vec![first];
            for _ in 1..n {
                group.push(bind_udp(addr, true).unwrap());
            }
            steer_by_inner_flow(&group[0], inner, n).unwrap();
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut hits = vec![0usize; n];
            for i in 0..300 {
                let ethertype = if i % 10 == 9 { 0x0806 } else { 0x0800 };
                let ihl = if i % 7 == 6 { 6 } else { 5 };
                let proto = [6, 17, 1][i % 3];
                let frag = [0, 0, 0, 0x2000, 0x0020][i % 5];
                let mut d = datagram(
                    inner,
                    ethertype,
                    ihl,
                    proto,
                    frag,
                    (rng.gen(), rng.gen()),
                    (rng.gen(), rng.gen()),
                );
                if i % 13 == 12 {
                    d.truncate(rng.gen_range(1..d.len()));
                }
                client.send_to(&d, addr).unwrap();
                let want = flow_socket(&d, inner, n as u32) as usize;
                let mut fds: Vec<libc::pollfd> = group
                    .iter()
                    .map(|s| libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: n valid pollfds.
                let rc = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, 2000) };
                assert_eq!(rc, 1, "datagram {i} arrived on exactly one socket");
                let got = fds.iter().position(|f| f.revents != 0).unwrap();
                let mut buf = [0u8; 256];
                let len = group[got].recv(&mut buf).unwrap();
                assert_eq!(&buf[..len], &d[..], "datagram {i}");
                assert_eq!(
                    got, want,
                    "datagram {i} ({n} sockets, prefix {inner}): {d:02x?}"
                );
                hits[got] += 1;
            }
            assert!(hits.iter().all(|&h| h > 0), "{hits:?}");
        }
    }
}
