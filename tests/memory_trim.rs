//! `memory::trim` hands memory a burst freed back to the system, where glibc alone keeps it.
//! Its own test binary: resident memory is the process's, and other tests would move it.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn memory_freed_below_a_live_allocation_goes_back_to_the_system() {
    fn resident_kb() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
    // 64 MB in 1 kB pieces, as parsed JSON is: each under the mmap threshold, so in the heap.
    let burst: Vec<Vec<u8>> = (0..65_536).map(|i| vec![(i % 251) as u8; 1024]).collect();
    // Something still alive above them keeps the heap's top from shrinking on its own.
    let survivor = vec![1u8; 1024];
    let during = resident_kb();
    drop(burst);
    let freed = resident_kb();
    assert!(chatrelease::memory::trim(), "malloc_trim released nothing");
    let trimmed = resident_kb();
    println!(
        "resident: {during} kB during the burst, {freed} kB after free, {trimmed} kB after trim"
    );
    assert!(
        freed > during - 16 * 1024,
        "free() alone kept the burst ({during} → {freed} kB)"
    );
    assert!(
        trimmed + 48 * 1024 < freed,
        "trim gave back less than 48 of the 64 MB ({freed} → {trimmed} kB)"
    );
    assert_eq!(survivor[0], 1);
}
