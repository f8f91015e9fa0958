//! Network config JSON: never a panic; an accepted config is self-consistent.
#![no_main]
use flannel::config::NetworkConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = NetworkConfig::parse(text) {
        assert!(c.subnet_len <= 30 && c.subnet_len >= c.network.prefix() + 2);
        assert!(c.network.contains(c.subnet_min) && c.network.contains(c.subnet_max));
        assert!(c.subnet_min <= c.subnet_max);
    }
});
