//! `harden_process` in a process of its own: it changes process-wide settings.

#[test]
fn harden_process_disables_core_dumps() {
    halfpipe_keystore::harden_process().unwrap();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    // "Max core file size  0  0  bytes": soft and hard limit both 0.
    assert_eq!(&fields[4..6], &["0", "0"], "{core}");
    // Calling it again is harmless.
    halfpipe_keystore::harden_process().unwrap();
}
