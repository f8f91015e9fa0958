//! Lease keys and values from other writers: never a panic; keys round-trip.
#![no_main]
use flannel::lease::store::RawLease;
use flannel::subnet::{key_suffix, parse_key, LeaseAttrs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (k, v) = data.split_at(split);
    let key = String::from_utf8_lossy(k).into_owned();
    if let Ok(sn) = parse_key(&key) {
        assert_eq!(parse_key(&key_suffix(sn)), Ok(sn));
    }
    if let Ok(a) = LeaseAttrs::from_json(v) {
        assert_eq!(LeaseAttrs::from_json(a.to_json().as_bytes()).unwrap(), a);
    }
    let _ = flannel::lease::decode(&RawLease { key, value: v.to_vec(), lease_id: 0, mod_revision: 0 });
});
