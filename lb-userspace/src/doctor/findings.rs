//! What `xdplb doctor` reports: one finding per problem, each saying what is
//! wrong, why it matters, and the commands that fix it.

use std::fmt::Write as _;

/// How bad a finding is.
///
/// An **error** is a setup that loses traffic as it stands: packets for a
/// VIP are dropped, or will be once the process exits. A **warning** is one
/// that loses traffic under conditions doctor cannot see from here (other
/// hosts' settings, the traffic's sizes and routes) or degrades service.
/// `xdplb doctor` exits 1 when there is an error, 0 otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub fn label(self) -> &'static str {
        match self {
            Severity::Warning => "WARNING",
            Severity::Error => "ERROR",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// A stable short name (the README lists every one), e.g. `veth-peer-xdp`.
    pub check: &'static str,
    /// What is wrong, naming the interface, address or path.
    pub what: String,
    /// Why it matters: what happens to the traffic.
    pub why: String,
    /// Commands that fix it, to run in this order.
    pub fix: Vec<String>,
    /// Another way to fix it, if there is one.
    pub alternative: Vec<String>,
}

impl Finding {
    pub fn error(check: &'static str, what: impl Into<String>, why: impl Into<String>) -> Self {
        Self::new(Severity::Error, check, what, why)
    }

    pub fn warning(check: &'static str, what: impl Into<String>, why: impl Into<String>) -> Self {
        Self::new(Severity::Warning, check, what, why)
    }

    fn new(severity: Severity, check: &'static str, what: impl Into<String>, why: impl Into<String>) -> Self {
        Self { severity, check, what: what.into(), why: why.into(), fix: Vec::new(), alternative: Vec::new() }
    }

    pub fn fix(mut self, command: impl Into<String>) -> Self {
        self.fix.push(command.into());
        self
    }

    pub fn or(mut self, command: impl Into<String>) -> Self {
        self.alternative.push(command.into());
        self
    }

    /// One line for a log: what, why, and the fix.
    pub fn log_line(&self) -> String {
        let mut s = format!("{}: {}; {}", self.check, self.what, self.why);
        if !self.fix.is_empty() {
            let _ = write!(s, "; fix: {}", self.fix.join(" && "));
        }
        if !self.alternative.is_empty() {
            let _ = write!(s, "; or: {}", self.alternative.join(" && "));
        }
        s
    }
}

/// Renders findings for a terminal, errors first, then a summary line.
pub fn render(findings: &[Finding], subject: &str) -> String {
    let mut sorted: Vec<&Finding> = findings.iter().collect();
    sorted.sort_by_key(|f| std::cmp::Reverse(f.severity));
    let mut out = String::new();
    for f in &sorted {
        let _ = writeln!(out, "{:<7} {}: {}", f.severity.label(), f.check, f.what);
        let _ = writeln!(out, "        why: {}", f.why);
        for (i, c) in f.fix.iter().enumerate() {
            let _ = writeln!(out, "        {} {c}", if i == 0 { "fix:" } else { "    " });
        }
        for (i, c) in f.alternative.iter().enumerate() {
            let _ = writeln!(out, "        {} {c}", if i == 0 { "or: " } else { "    " });
        }
    }
    let errors = findings.iter().filter(|f| f.severity == Severity::Error).count();
    let warnings = findings.len() - errors;
    if findings.is_empty() {
        let _ = writeln!(out, "{subject}: no problem found");
    } else {
        let _ = writeln!(out, "{subject}: {} error(s), {} warning(s)", errors, warnings);
    }
    out
}

/// Whether `xdplb doctor` should fail.
pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_come_first_with_why_fix_and_alternative() {
        let w = Finding::warning("w-check", "a warning", "because").fix("cmd w");
        let e = Finding::error("e-check", "an error", "it drops").fix("cmd 1").fix("cmd 2").or("other way");
        let text = render(&[w, e], "lb0");
        let expected = "\
ERROR   e-check: an error
        why: it drops
        fix: cmd 1
             cmd 2
        or:  other way
WARNING w-check: a warning
        why: because
        fix: cmd w
lb0: 1 error(s), 1 warning(s)
";
        assert_eq!(text, expected);
    }

    #[test]
    fn no_finding_says_so_and_does_not_fail() {
        assert_eq!(render(&[], "backend"), "backend: no problem found\n");
        assert!(!has_errors(&[]));
        assert!(!has_errors(&[Finding::warning("w", "x", "y")]));
        assert!(has_errors(&[Finding::warning("w", "x", "y"), Finding::error("e", "x", "y")]));
    }

    #[test]
    fn a_log_line_holds_everything() {
        let f = Finding::warning("veth-tx-checksum", "lb0 keeps tx checksum offload on", "frames lose it")
            .fix("ethtool -K lb0 tx off")
            .or("xdplb run --xdp-mode skb");
        assert_eq!(
            f.log_line(),
            "veth-tx-checksum: lb0 keeps tx checksum offload on; frames lose it; fix: ethtool -K lb0 tx off; or: xdplb run --xdp-mode skb"
        );
    }
}
