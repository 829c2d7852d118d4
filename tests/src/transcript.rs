//! Transcripts of a scripted session and their normalization.
//!
//! A transcript is a list of text lines, one per observed result. While the
//! session runs, revisions are written into the lines as placeholders (see
//! [`rev`]); [`Transcript::normalized`] replaces each distinct revision value by
//! its rank among all revision values seen in the transcript, so two servers
//! whose revision numbers differ but are ordered the same way produce equal
//! normalized transcripts. Lease IDs chosen by the server are replaced by
//! `L1`, `L2`, ... in order of first appearance as soon as they are recorded
//! (see [`Transcript::lease`]); IDs the client chose are kept exactly.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

const REV_OPEN: &str = "\u{27e6}r:";
const REV_CLOSE: char = '\u{27e7}';

/// Renders a revision as a placeholder that [`Transcript::normalized`] turns
/// into its rank (`r1`, `r2`, ...). Revision 0 means "none" in etcd (a missing
/// key's mod_revision, no compaction) and is kept literally.
pub fn rev(r: i64) -> String {
    if r == 0 {
        "0".to_string()
    } else {
        format!("{REV_OPEN}{r}{REV_CLOSE}")
    }
}

/// The recorded results of one scripted session against one server.
///
/// Cloning gives another handle to the same transcript (so a session that is
/// cut short by a timeout still leaves what it recorded).
#[derive(Debug, Default, Clone)]
pub struct Transcript {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    lines: Vec<String>,
    notes: Vec<String>,
    lease_labels: HashMap<i64, String>,
    explicit_leases: HashSet<i64>,
}

impl Transcript {
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (plain pushes).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one compared line: `step` names the operation, `line` is its result.
    pub fn push(&mut self, step: &str, line: impl AsRef<str>) {
        let line = format!("{step} | {}", line.as_ref());
        self.inner().lines.push(line);
    }

    /// Records information that is NOT compared (e.g. a subprocess's stderr),
    /// printed when the comparison fails.
    pub fn note(&mut self, step: &str, text: impl AsRef<str>) {
        let note = format!("{step} | {}", text.as_ref());
        self.inner().notes.push(note);
    }

    pub fn notes(&self) -> Vec<String> {
        self.inner().notes.clone()
    }

    /// Declares a lease ID chosen by the client: it is recorded as is.
    pub fn explicit_lease(&mut self, id: i64) {
        self.inner().explicit_leases.insert(id);
    }

    /// The stable label of a lease ID: `0` for no lease, the exact hex value
    /// for IDs the client chose, otherwise `L<n>` in order of first appearance.
    pub fn lease(&mut self, id: i64) -> String {
        if id == 0 {
            return "0".to_string();
        }
        let mut inner = self.inner();
        if inner.explicit_leases.contains(&id) {
            return format!("{id:#x}");
        }
        let next = inner.lease_labels.len() + 1;
        inner
            .lease_labels
            .entry(id)
            .or_insert_with(|| format!("L{next}"))
            .clone()
    }

    /// The raw lines, with revision placeholders.
    pub fn raw(&self) -> Vec<String> {
        self.inner().lines.clone()
    }

    pub fn len(&self) -> usize {
        self.inner().lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner().lines.is_empty()
    }

    /// Replaces line `index` (its step name is kept).
    pub fn replace(&mut self, index: usize, line: impl AsRef<str>) {
        let mut inner = self.inner();
        if let Some(old) = inner.lines.get_mut(index) {
            let step = old.split(" | ").next().unwrap_or_default().to_string();
            *old = format!("{step} | {}", line.as_ref());
        }
    }

    /// The lines with every revision replaced by its rank among all distinct
    /// revision values of this transcript (`r1` is the smallest).
    pub fn normalized(&self) -> Vec<String> {
        let lines = self.raw();
        let mut all = BTreeSet::new();
        for line in &lines {
            for_each_rev(line, |r| {
                all.insert(r);
            });
        }
        let rank: HashMap<i64, usize> = all.iter().enumerate().map(|(i, r)| (*r, i + 1)).collect();
        lines
            .iter()
            .map(|line| replace_revs(line, |r| format!("r{}", rank[&r])))
            .collect()
    }
}

fn for_each_rev(line: &str, mut f: impl FnMut(i64)) {
    let _ = replace_revs(line, |r| {
        f(r);
        String::new()
    });
}

fn replace_revs(line: &str, mut f: impl FnMut(i64) -> String) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find(REV_OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + REV_OPEN.len()..];
        let Some(end) = after.find(REV_CLOSE) else {
            out.push_str(&rest[start..]);
            return out;
        };
        match after[..end].parse::<i64>() {
            Ok(r) => out.push_str(&f(r)),
            Err(_) => {
                out.push_str(&rest[start..start + REV_OPEN.len() + end + REV_CLOSE.len_utf8()])
            }
        }
        rest = &after[end + REV_CLOSE.len_utf8()..];
    }
    out.push_str(rest);
    out
}

/// Compares two transcripts after normalization. Writes both (raw and
/// normalized) to `out_dir`; on a mismatch returns a readable report: a
/// unified line diff of the first mismatching hunks plus the notes of both
/// sides.
pub fn compare(
    expected_name: &str,
    expected: &Transcript,
    actual_name: &str,
    actual: &Transcript,
    out_dir: &Path,
) -> Result<(), String> {
    let a = expected.normalized();
    let b = actual.normalized();
    let written = std::fs::create_dir_all(out_dir).is_ok_and(|()| {
        [(expected_name, expected, &a), (actual_name, actual, &b)]
            .into_iter()
            .all(|(name, t, norm)| {
                let base = out_dir.join(sanitize(name));
                std::fs::write(
                    base.with_extension("normalized.txt"),
                    norm.join("\n") + "\n",
                )
                .is_ok()
                    && std::fs::write(base.with_extension("raw.txt"), t.raw().join("\n") + "\n")
                        .is_ok()
            })
    });
    if a == b {
        return Ok(());
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "transcripts differ: {expected_name} ({} lines) vs {actual_name} ({} lines)",
        a.len(),
        b.len()
    );
    if written {
        let _ = writeln!(
            report,
            "full transcripts written to {} (<name>.normalized.txt, <name>.raw.txt)",
            out_dir.display()
        );
    }
    let _ = writeln!(report, "--- {expected_name}\n+++ {actual_name}");
    report.push_str(&unified_diff(&a, &b, 3, 80));
    for (name, t) in [(expected_name, expected), (actual_name, actual)] {
        if !t.notes().is_empty() {
            let _ = writeln!(report, "notes of {name} (not compared):");
            for n in &t.notes() {
                let _ = writeln!(report, "  {n}");
            }
        }
    }
    Err(report)
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Same(usize, usize),
    Del(usize),
    Ins(usize),
}

/// Line diff by longest common subsequence (the transcripts are a few hundred
/// lines, so the quadratic table is cheap).
fn diff_ops(a: &[String], b: &[String]) -> Vec<Op> {
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![0u32; (n + 1) * (m + 1)];
    let idx = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[idx(i, j)] = if a[i] == b[j] {
                lcs[idx(i + 1, j + 1)] + 1
            } else {
                lcs[idx(i + 1, j)].max(lcs[idx(i, j + 1)])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::with_capacity(n + m);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push(Op::Same(i, j));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[idx(i + 1, j)] >= lcs[idx(i, j + 1)]) {
            ops.push(Op::Del(i));
            i += 1;
        } else {
            ops.push(Op::Ins(j));
            j += 1;
        }
    }
    ops
}

/// A unified diff with `context` lines around changes, cut after `max_lines`
/// output lines.
fn unified_diff(a: &[String], b: &[String], context: usize, max_lines: usize) -> String {
    let ops = diff_ops(a, b);
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| !matches!(op, Op::Same(..)))
        .map(|(k, _)| k)
        .collect();
    let mut show = vec![false; ops.len()];
    for &k in &changed {
        for s in show
            .iter_mut()
            .take((k + context + 1).min(ops.len()))
            .skip(k.saturating_sub(context))
        {
            *s = true;
        }
    }
    let mut out = String::new();
    let mut printed = 0;
    let mut last_shown: Option<usize> = None;
    for (k, op) in ops.iter().enumerate() {
        if !show[k] {
            continue;
        }
        if printed >= max_lines {
            let _ = writeln!(
                out,
                "... diff cut after {max_lines} lines ({} changed lines in total)",
                changed.len()
            );
            break;
        }
        if last_shown.is_none_or(|l| l + 1 != k) {
            let (ai, bi) = position(&ops, k);
            let _ = writeln!(
                out,
                "@@ expected line {} / actual line {} @@",
                ai + 1,
                bi + 1
            );
        }
        last_shown = Some(k);
        printed += 1;
        let _ = match *op {
            Op::Same(i, _) => writeln!(out, "  {}", a[i]),
            Op::Del(i) => writeln!(out, "- {}", a[i]),
            Op::Ins(j) => writeln!(out, "+ {}", b[j]),
        };
    }
    out
}

fn position(ops: &[Op], k: usize) -> (usize, usize) {
    let (mut ai, mut bi) = (0, 0);
    for op in &ops[..k] {
        match op {
            Op::Same(..) => {
                ai += 1;
                bi += 1;
            }
            Op::Del(_) => ai += 1,
            Op::Ins(_) => bi += 1,
        }
    }
    (ai, bi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_ranked() {
        let mut t = Transcript::new();
        t.push("a", format!("hdr={} kv.mod={}", rev(17), rev(5)));
        t.push("b", format!("hdr={} none={}", rev(17), rev(0)));
        t.push("c", format!("hdr={}", rev(1000)));
        assert_eq!(
            t.normalized(),
            vec!["a | hdr=r2 kv.mod=r1", "b | hdr=r2 none=0", "c | hdr=r3"]
        );
        let mut u = Transcript::new();
        u.push("a", format!("hdr={} kv.mod={}", rev(3), rev(2)));
        u.push("b", format!("hdr={} none={}", rev(3), rev(0)));
        u.push("c", format!("hdr={}", rev(4)));
        assert_eq!(t.normalized(), u.normalized());
    }

    #[test]
    fn leases_are_labelled_in_order_of_appearance() {
        let mut t = Transcript::new();
        t.explicit_lease(0x1234);
        assert_eq!(t.lease(99), "L1");
        assert_eq!(t.lease(0x1234), "0x1234");
        assert_eq!(t.lease(7), "L2");
        assert_eq!(t.lease(99), "L1");
        assert_eq!(t.lease(0), "0");
    }

    #[test]
    fn compare_reports_the_first_difference() {
        let mut a = Transcript::new();
        let mut b = Transcript::new();
        for i in 0..20 {
            a.push(&format!("step {i}"), format!("hdr={}", rev(100 + i)));
            b.push(&format!("step {i}"), format!("hdr={}", rev(5 + i)));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(compare("a", &a, "b", &b, dir.path()).is_ok());
        b.push("step 20", "ERR NotFound \"x\"");
        a.push("step 20", format!("hdr={}", rev(200)));
        b.note("step 20", "server said something");
        let report = compare("a", &a, "b", &b, dir.path()).expect_err("must differ");
        assert!(report.contains("- step 20 | hdr=r21"), "{report}");
        assert!(report.contains("+ step 20 | ERR NotFound"), "{report}");
        assert!(report.contains("server said something"), "{report}");
        assert!(dir.path().join("a.normalized.txt").exists());
    }

    #[test]
    fn diff_shows_changes() {
        let a: Vec<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
        let b: Vec<String> = ["x", "Y", "z", "w"].iter().map(|s| s.to_string()).collect();
        let d = unified_diff(&a, &b, 1, 100);
        assert!(d.contains("- y"), "{d}");
        assert!(d.contains("+ Y"), "{d}");
        assert!(d.contains("+ w"), "{d}");
        assert!(d.contains("  x"), "{d}");
    }
}
