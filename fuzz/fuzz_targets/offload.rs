//! virtio_net_hdr + super-packet from the TUN: the splitter never panics,
//! every segment it makes is a valid IPv4 packet, and coalescing the
//! segments never panics either.
#![no_main]
use flannel::datapath::offload::{coalesce, coalesce_run, gso_split, VnetHdr, VNET_HDR_LEN};
use flannel::wire::Ipv4Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(hdr) = VnetHdr::decode(data) else { return };
    let pkt = &data[VNET_HDR_LEN..];
    let mut out = vec![0u8; 200_000];
    if let Ok(s) = gso_split(pkt, &hdr, &mut out) {
        let segs: Vec<&[u8]> = (0..s.count)
            .map(|k| &out[k * s.seg_len..((k + 1) * s.seg_len).min(s.total)])
            .collect();
        for seg in &segs {
            let v = Ipv4Packet::new_checked(*seg).expect("segment is one IPv4 packet");
            assert!(v.header_checksum_ok());
        }
        let n = coalesce_run(segs.iter().copied());
        if n > 1 {
            let mut sp = vec![0u8; 70_000];
            coalesce(segs[..n].iter().copied(), &mut sp).expect("a run found coalesces");
        }
    }
    // Arbitrary packets as a GRO run.
    let parts: Vec<&[u8]> = pkt.chunks(97).collect();
    let n = coalesce_run(parts.iter().copied());
    if n > 1 {
        let mut sp = vec![0u8; 70_000];
        coalesce(parts[..n].iter().copied(), &mut sp).expect("a run found coalesces");
    }
});
