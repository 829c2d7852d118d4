//! What a workload measured, and how it is printed.

use std::time::Duration;

/// Latencies and counts of one workload run.
#[derive(Debug, Default)]
pub struct Measured {
    pub workload: &'static str,
    /// One per successful operation, in microseconds.
    pub latencies_us: Vec<u32>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// What one operation is, for the table ("put", "list of 100000 keys").
    pub unit: String,
}

impl Measured {
    /// Adds what one client measured.
    pub fn absorb(&mut self, other: ClientResult) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn sorted(&self) -> Vec<u32> {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        l
    }

    fn percentile(sorted: &[u32], p: f64) -> f64 {
        percentile_ms(sorted, p)
    }

    fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.latencies_us.len() as f64 / secs
        } else {
            0.0
        }
    }

    pub fn json(&self, endpoint: &str, clients: usize, conns: usize, rss: Option<u64>) -> String {
        let s = self.sorted();
        let p = |q| Self::percentile(&s, q);
        format!(
            "{{\"workload\":\"{}\",\"unit\":{},\"endpoint\":\"{endpoint}\",\"clients\":{clients},\"conns\":{conns},\"ok\":{},\"errors\":{},\"per_second\":{:.0},\"p50_ms\":{:.2},\"p90_ms\":{:.2},\"p95_ms\":{:.2},\"p99_ms\":{:.2},\"server_peak_rss_mib\":{}}}",
            self.workload,
            serde_json::Value::from(self.unit.as_str()),
            s.len(),
            self.errors,
            self.rate(),
            p(0.5),
            p(0.9),
            p(0.95),
            p(0.99),
            rss.map_or("null".to_string(), |r| r.to_string())
        )
    }

    pub fn table(&self, rss: Option<u64>) -> String {
        let s = self.sorted();
        let p = |q| Self::percentile(&s, q);
        format!(
            "{} ({})  ok {}  errors {}  {:.0}/s  p50 {:.2} ms  p90 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  server peak RSS {}",
            self.workload,
            self.unit,
            s.len(),
            self.errors,
            self.rate(),
            p(0.5),
            p(0.9),
            p(0.95),
            p(0.99),
            rss.map_or("?".to_string(), |r| format!("{r} MiB"))
        )
    }
}

/// What one client task measured.
#[derive(Debug, Default)]
pub struct ClientResult {
    pub latencies_us: Vec<u32>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl ClientResult {
    pub fn ok(&mut self, took: Duration) {
        self.latencies_us
            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn failed(&mut self, e: impl ToString) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// The p-th percentile (0..=1) of sorted microsecond latencies, in
/// milliseconds (nearest rank).
pub fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

/// The peak resident set size of a process (VmHWM), in MiB, if readable.
/// A process's memory now, in MiB: its proportional set size (shared pages
/// divided among the processes sharing them, so that PostgreSQL's shared
/// buffers count once over its processes), or None if it is gone.
pub fn pss_mib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The ids of the processes named `comm` (e.g. every PostgreSQL backend).
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

pub fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_rate() -> serde_json::Result<()> {
        let m = Measured {
            workload: "put",
            unit: "1 KiB \"values\"".into(),
            latencies_us: (1..=100).map(|i| i * 1000).collect(),
            elapsed: Duration::from_secs(10),
            ..Default::default()
        };
        let s = m.sorted();
        assert_eq!(Measured::percentile(&s, 0.5), 51.0);
        assert_eq!(Measured::percentile(&s, 0.99), 99.0);
        assert_eq!(m.rate(), 10.0);
        let json = m.json("http://x", 1, 1, Some(12));
        assert!(json.contains("\"per_second\":10,"), "{json}");
        assert!(json.contains("\"server_peak_rss_mib\":12}"), "{json}");
        let parsed: serde_json::Value = serde_json::from_str(&json)?;
        assert_eq!(parsed["unit"], "1 KiB \"values\"");
        Ok(())
    }

    #[test]
    fn rss_of_this_process() {
        assert!(peak_rss_mib(std::process::id()).is_some_and(|m| m > 0));
    }
}
