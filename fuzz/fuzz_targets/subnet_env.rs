//! subnet.env from a previous run: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flannel::subnet_env::previous_subnet(&String::from_utf8_lossy(data));
});
