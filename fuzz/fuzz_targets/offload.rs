//! virtio_net_hdr + super-packet from the TUN, through the production
//! path: the egress loop's segments (`Segments::of`, headers built, pieces
//! gathered) never panic and each is a valid IPv4 packet; the ingress
//! loop's GRO table groups them, and every item's super-packet header
//! builds. Arbitrary bytes as a received batch go through the same table.
#![no_main]
use flannel::datapath::offload::{coalesce_header, GroTable, Segments, VnetHdr, VNET_HDR_LEN};
use flannel::wire::Ipv4Packet;
use libfuzzer_sys::fuzz_target;

fn gro(pkts: &[&[u8]]) {
    let mut g = GroTable::new();
    g.group(pkts.len(), |i| pkts[i]);
    let mut seen = 0;
    let mut head = [0u8; VNET_HDR_LEN + 120];
    for k in 0..g.items() {
        let item: Vec<usize> = g.item(k).collect();
        seen += item.len();
        if item.len() > 1 {
            coalesce_header(item.iter().map(|&i| pkts[i]), &mut head)
                .expect("an item the table made coalesces");
        }
    }
    assert_eq!(seen, pkts.len(), "every packet is in exactly one item");
}

fuzz_target!(|data: &[u8]| {
    let Ok(hdr) = VnetHdr::decode(data) else { return };
    let pkt = &data[VNET_HDR_LEN..];
    if let Ok(segs) = Segments::of(pkt, &hdr) {
        if let Ok(all) = segs.collect(pkt) {
            assert_eq!(all.len(), segs.count());
            if hdr.gso_type != 0 {
                for seg in &all {
                    let v = Ipv4Packet::new_checked(&seg[..]).expect("segment is one IPv4 packet");
                    assert!(v.header_checksum_ok());
                }
            }
            let refs: Vec<&[u8]> = all.iter().map(|s| &s[..]).collect();
            gro(&refs);
        }
    }
    let parts: Vec<&[u8]> = pkt.chunks(97).collect();
    gro(&parts);
});
