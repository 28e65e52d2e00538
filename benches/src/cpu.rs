//! CPU time as the benchmarks count it, from /proc: the whole machine's busy time, a
//! process's or thread's own.

use std::collections::BTreeMap;
use std::path::Path;

/// CPU time the whole machine has spent busy (every process, every core), in seconds, from
/// /proc/stat (in USER_HZ = 1/100 s on Linux). The sinks, the broker and the runner share the
/// machine, so a phase's busy time per item is what that phase costs the machine.
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: busy is user, nice, system, irq and
    // softirq (not idle, iowait, nor time the hypervisor gave to someone else).
    let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    busy / 100.0
}

/// A /proc stat file's command name, and its own and its reaped children's CPU time (s).
pub fn proc_stat(path: &Path) -> Option<(String, f64, f64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let (head, rest) = s.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    // After the name: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    // utime stime cutime cstime …
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|x| x.parse().ok())
        .collect();
    (f.len() == 4).then(|| (comm, (f[0] + f[1]) / 100.0, (f[2] + f[3]) / 100.0))
}

/// CPU time of every PostgreSQL server process (s), its reaped children included.
pub fn postgres_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| proc_stat(&e.path().join("stat")))
        .filter(|(comm, _, _)| comm == "postgres")
        .map(|(_, own, children)| own + children)
        .sum()
}

/// CPU time of this process's live threads, by thread name (s).
pub fn thread_secs() -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for (comm, own, _) in dir
            .flatten()
            .filter_map(|e| proc_stat(&e.path().join("stat")))
        {
            *by_name.entry(comm).or_insert(0.0) += own;
        }
    }
    by_name
}
