//! The checker's report: each step's outcome, what the plugin was seen to support, and its
//! last output lines, rendered as text with everything the plugin wrote escaped.
//! It knows nothing of how the steps are run.

use std::fmt::Write as _;
use std::path::Path;

use torud_api::text::escape;

/// The outcome of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It worked; the detail says what was seen.
    Pass(String),
    /// It did not; the reason says what was expected and what happened.
    Fail(String),
    /// Not applicable to this plugin (for example, protocol-2 steps for a v1 plugin).
    Skip(String),
}

/// One step of the check.
#[derive(Debug, Clone)]
pub struct Step {
    /// Short name, e.g. `kv set`.
    pub name: &'static str,
    /// What happened.
    pub outcome: Outcome,
}

/// The whole check.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The steps, in the order run.
    pub steps: Vec<Step>,
    /// What the plugin was seen to support.
    pub supports: Vec<String>,
    /// The plugin's last stderr lines (shown when a step failed).
    pub stderr_tail: Vec<String>,
}

impl Report {
    /// Records a step; whether it did not fail.
    pub(super) fn add(&mut self, name: &'static str, outcome: Outcome) -> bool {
        let ok = !matches!(outcome, Outcome::Fail(_));
        self.steps.push(Step { name, outcome });
        ok
    }

    /// Steps that failed.
    pub fn failures(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Fail(_)))
            .count()
    }

    /// The report as text, one line per step.
    pub fn render(&self, path: &Path) -> String {
        let mut out = format!(
            "torud plugin check {}\n",
            escape(&path.display().to_string())
        );
        for step in &self.steps {
            let (tag, text) = match &step.outcome {
                Outcome::Pass(t) => ("PASS", t),
                Outcome::Fail(t) => ("FAIL", t),
                Outcome::Skip(t) => ("SKIP", t),
            };
            let _ = writeln!(out, "  {tag}  {:<12} {}", step.name, escape(text));
        }
        if !self.supports.is_empty() {
            let _ = writeln!(out, "supports: {}", escape(&self.supports.join(", ")));
        }
        if self.failures() > 0 && !self.stderr_tail.is_empty() {
            let _ = writeln!(out, "last stderr lines of the plugin:");
            for line in &self.stderr_tail {
                let _ = writeln!(out, "  | {}", escape(line));
            }
        }
        let run = self
            .steps
            .iter()
            .filter(|s| !matches!(s.outcome, Outcome::Skip(_)))
            .count();
        let verdict = if self.failures() == 0 {
            "conforms"
        } else {
            "does NOT conform"
        };
        let _ = writeln!(
            out,
            "verdict: {verdict} ({} of {run} checks failed)",
            self.failures()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_shows_what_the_plugin_wrote_escaped() {
        let report = Report {
            steps: vec![Step {
                name: "call",
                outcome: Outcome::Fail("answered \x1b[2J\r".into()),
            }],
            supports: vec![],
            stderr_tail: vec!["\x1b]0;title\x07".into()],
        };
        let text = report.render(Path::new("/p/x.binary"));
        assert!(!text.contains(['\x1b', '\r', '\x07']), "{text:?}");
        assert!(text.contains("answered \\e[2J\\r") && text.contains("| \\e]0;title\\x07"));
    }
}
