//! `cargo bench --bench e2e`: the end-to-end namespace benchmark
//! (`benches/e2e.sh`: veth, kernel VXLAN, flannel-rs offloads off/on). It
//! needs root; under `cargo test` it only says how to run it.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("e2e: skipped outside `cargo bench --bench e2e` (needs root; see benches/e2e.sh)");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("e2e: skipped, not root (run: sudo benches/e2e.sh)");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/e2e.sh");
    let status = std::process::Command::new(script)
        .status()
        .expect("running benches/e2e.sh");
    std::process::exit(status.code().unwrap_or(1));
}
